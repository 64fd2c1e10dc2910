"""nn.Modules: feature maps, hybrid attention, HyperAttention, model surgery, attention transfer, LoRA."""
