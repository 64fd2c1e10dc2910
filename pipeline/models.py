"""Build teacher models from a ModelConfig: the real SmolLM2, a Hugging Face directory, or deterministic
random weights at a published shape.

Random weights are a pure function of (seed, tensor name): every tensor gets its own generator, so the
k layers a block worker builds on its own are bit-identical to the same layers of the whole model, and
no process ever needs the whole 70B/405B model to make its part of it.
"""

from __future__ import annotations

import importlib
import math
import zlib
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from blocks.stack import LayerStack

from .config import ModelConfig

_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def hf_config(model_cfg: ModelConfig, **overrides):
    """The transformers config object for this model (eager/SDPA attention, no hub access)."""
    fields = dict(model_cfg.hf_config)
    fields.update(overrides)
    config = AutoConfig.for_model(_MODEL_TYPES[model_cfg.architecture], **fields)
    config.architectures = [model_cfg.architecture]
    config._attn_implementation = "sdpa"
    return config


def _modeling_classes(model_cfg: ModelConfig):
    model_type = _MODEL_TYPES[model_cfg.architecture]
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    prefix = model_cfg.architecture.removesuffix("ForCausalLM")
    return getattr(module, f"{prefix}DecoderLayer"), getattr(module, f"{prefix}RotaryEmbedding")


RANDOM_CHUNK = 1 << 22
"""Elements per independently seeded piece of a random tensor (4M): the pieces are generated in parallel
threads, and the result depends only on (seed, name, number of elements), never on the thread count. Any
range of a tensor can be made on its own (random_tensor_range): a piece depends on nothing outside it."""


def _tensor_seed(seed: int, name: str, chunk: int = 0) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode()) + chunk * 7_919) % (2**63 - 1)


def _chunk_normals(seed: int, name: str, numel: int, chunk: int) -> torch.Tensor:
    """Piece `chunk` of the flat tensor `name` of `numel` elements, whole (fp32). It is always generated at its
    full length: torch's randn(n) is not a prefix of randn(m) for n < m, so a piece cannot be cut short."""
    length = min(RANDOM_CHUNK, numel - chunk * RANDOM_CHUNK)
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name, chunk))
    return torch.randn(length, generator=gen, dtype=torch.float32).mul_(0.02)


def _check_range(numel: int, start: int, stop: int) -> None:
    if not 0 <= start <= stop <= numel:
        raise ValueError(f"start={start}, stop={stop}: need 0 <= start <= stop <= numel={numel}; pass a range "
                         "inside the flat tensor")


def random_tensor_range(seed: int, name: str, numel: int, start: int, stop: int,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Elements [start, stop) of the flat random tensor `name` of `numel` elements, on CPU: bit-identical to
    random_tensor(seed, name, shape, dtype).view(-1)[start:stop] for any shape of `numel` elements. Only the
    RANDOM_CHUNK pieces that overlap the range are generated, so a ZeRO-3 rank makes just its partition."""
    from concurrent.futures import ThreadPoolExecutor

    _check_range(numel, start, stop)
    out = torch.empty(stop - start, dtype=torch.float32)

    def fill(chunk: int) -> None:
        first = chunk * RANDOM_CHUNK
        values = _chunk_normals(seed, name, numel, chunk)
        lo, hi = max(start, first), min(stop, first + values.numel())
        out[lo - start:hi - start].copy_(values[lo - first:hi - first])

    chunks = range(start // RANDOM_CHUNK, -(-stop // RANDOM_CHUNK)) if stop > start else range(0)
    if len(chunks) <= 1:
        for chunk in chunks:
            fill(chunk)
    else:
        # torch's thread count, not the machine's cores: a Ray task gets its share (workers set it per task), so
        # tasks building weights side by side do not oversubscribe the host
        with ThreadPoolExecutor(max_workers=min(len(chunks), torch.get_num_threads())) as pool:
            list(pool.map(fill, chunks))
    return out.to(dtype)


def random_tensor(seed: int, name: str, shape: tuple[int, ...] | torch.Size,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The deterministic N(0, 0.02) weight called `name` (on CPU). A CPU generator makes ~140M normals/s on
    one core, so a 70B model would take minutes per process; each RANDOM_CHUNK piece has its own generator
    and the pieces run in a thread pool (torch releases the GIL), one per torch thread."""
    numel = math.prod(shape)
    return random_tensor_range(seed, name, numel, 0, numel, dtype).view(tuple(shape))


def random_value_range(seed: int, name: str, numel: int, start: int, stop: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Elements [start, stop) of random_value(seed, name, shape, dtype).view(-1), `numel` = the shape's size:
    1 for norms, 0 for biases, random_tensor_range otherwise."""
    _check_range(numel, start, stop)
    if "norm" in name:
        return torch.ones(stop - start, dtype=dtype)
    if name.endswith("bias"):
        return torch.zeros(stop - start, dtype=dtype)
    return random_tensor_range(seed, name, numel, start, stop, dtype)


def random_value(seed: int, name: str, shape: tuple[int, ...] | torch.Size,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What random_init_ gives the parameter `name`: 1 for norms, 0 for biases, random_tensor otherwise."""
    numel = math.prod(shape)
    return random_value_range(seed, name, numel, 0, numel, dtype).view(tuple(shape))


@torch.no_grad()
def random_init_(module: nn.Module, seed: int, prefix: str = "") -> None:
    """Deterministic init by tensor name: norms = 1, biases = 0, every other weight ~ N(0, 0.02)."""
    for name, param in module.named_parameters():
        param.copy_(random_value(seed, prefix + name, param.shape, param.dtype))


def model_directory(model_cfg: ModelConfig) -> Path | None:
    """Where real weights live (None for random weights)."""
    if model_cfg.weights == "random":
        return None
    if model_cfg.weights == "smollm2":
        from .assets import ensure_smollm2
        return ensure_smollm2()
    path = Path(model_cfg.weights)
    if not (path / "config.json").exists():
        raise ValueError(f"model.weights: {model_cfg.weights!r} is not 'smollm2', 'random' or a Hugging Face model "
                         "directory with a config.json")
    return path


def teacher_config(model_cfg: ModelConfig):
    """The transformers config of the model as load_model builds it: the preset's for random weights, the
    directory's config.json (with SDPA attention) for a checkpoint."""
    directory = model_directory(model_cfg)
    if directory is None:
        return hf_config(model_cfg)
    config = AutoConfig.from_pretrained(directory)
    config._attn_implementation = "sdpa"
    return config


def load_model(model_cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The whole teacher model (only for shapes that fit in memory)."""
    directory = model_directory(model_cfg)
    if directory is not None:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa")
        return model.to(device).eval()
    config = hf_config(model_cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device="cpu")
    random_init_(model, model_cfg.seed)
    model.model.rotary_emb = _rotary(model_cfg, config, "cpu")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(device=device, dtype=dtype).eval()


def _rotary(model_cfg: ModelConfig, config, device):
    _, rotary_cls = _modeling_classes(model_cfg)
    # transformers 5.23 dropped the `device` argument that 5.17 (the GPU machine) still accepts.
    return rotary_cls(config=config).to(device)


def load_tokenizer(model_cfg: ModelConfig):
    """The model's tokenizer (real weights only; random-weight presets have none)."""
    from transformers import AutoTokenizer
    directory = model_directory(model_cfg)
    if directory is None:
        raise ValueError(f"model {model_cfg.name}: random weights have no tokenizer; use token ids directly")
    return AutoTokenizer.from_pretrained(directory)


def load_layer_stack(model_cfg: ModelConfig, start: int, end: int, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> LayerStack:
    """Layers [start, end) only, with their own weights: read from the checkpoint's safetensors (only those
    tensors) or generated from the seed. Never materialises the rest of the model."""
    if not 0 <= start < end <= model_cfg.num_layers:
        raise ValueError(f"layers [{start}, {end}) are outside 0..{model_cfg.num_layers} of {model_cfg.name}")
    config = hf_config(model_cfg)
    layer_cls, _ = _modeling_classes(model_cfg)
    with torch.device("meta"):
        layers = nn.ModuleList(layer_cls(config, layer_idx=i) for i in range(start, end))
    # Materialised in the target dtype on the target device, filled from host pieces one tensor at a time: built
    # in fp32 on the host first, a 40-layer block of the 70B shape took 137 GB of host memory per task, and a
    # block and a collect task building side by side ran a 251 GB host out of memory (docs/results.md, section 8).
    layers = layers.to(dtype=dtype).to_empty(device=device)
    directory = model_directory(model_cfg)
    if directory is None:
        for offset, layer in enumerate(layers):
            random_init_(layer, model_cfg.seed, prefix=f"model.layers.{start + offset}.")
    else:
        _load_layer_weights(directory, layers, start)
    for layer in layers:
        # Layers are built standalone, so give attention the implementation the whole model would use.
        layer.self_attn.config._attn_implementation = "sdpa"
    return LayerStack(layers, _rotary(model_cfg, config, device), start, config).eval()


EMBEDDING_KEY = "model.embed_tokens.weight"


def load_embeddings(model_cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> nn.Embedding:
    """The token-embedding table only (`model.embed_tokens.weight`): boundary 0 of the hidden-state cache is
    embed(tokens), the raw residual stream entering layer 0. Read from the checkpoint's safetensors, or
    generated from the seed by tensor name (bit-identical to the same table of load_model)."""
    with torch.device("meta"):
        embedding = nn.Embedding(model_cfg.vocab_size, model_cfg.hidden_size)
    embedding = embedding.to(dtype=dtype).to_empty(device=device)  # as load_layer_stack: no fp32 host copy
    directory = model_directory(model_cfg)
    if directory is None:
        random_init_(embedding, model_cfg.seed, prefix=EMBEDDING_KEY.removesuffix("weight"))
    else:
        from safetensors import safe_open
        files = sorted(directory.glob("*.safetensors"))
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                if EMBEDDING_KEY in f.keys():
                    with torch.no_grad():
                        embedding.weight.copy_(f.get_tensor(EMBEDDING_KEY))
                    break
        else:
            raise ValueError(f"{directory}: no {EMBEDDING_KEY} in {[f.name for f in files]}")
    return embedding.eval()


def _load_layer_weights(directory: Path, layers: nn.ModuleList, start: int) -> None:
    from safetensors import safe_open
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory}: no .safetensors files to read layer weights from")
    wanted = {}
    for offset, layer in enumerate(layers):
        for name in layer.state_dict():
            wanted[f"model.layers.{start + offset}.{name}"] = (layer, name)
    found = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in wanted:
                    layer, name = wanted[key]
                    tensor = f.get_tensor(key)
                    with torch.no_grad():
                        layer.get_parameter(name).copy_(tensor) if name in dict(layer.named_parameters()) \
                            else layer.get_buffer(name).copy_(tensor)
                    found.add(key)
    missing = sorted(set(wanted) - found)
    if missing:
        raise ValueError(f"{directory}: checkpoint lacks {len(missing)} tensors for layers, e.g. {missing[:3]}")
