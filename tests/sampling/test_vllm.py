"""tether's side of the vLLM engine, with a stand-in for ``vllm.LLM`` (vLLM itself needs a CUDA machine): weight
pushes reach ``load_weights`` under Hugging Face names with LoRA merged, and outputs become ``Completions``."""

from types import SimpleNamespace

import torch

from tether.models import apply_lora
from tether.sampling.vllm import VLLMEngine
from tether.testing import tiny_model


class FakeLLM:
    def __init__(self):
        self.loaded: dict[str, torch.Tensor] = {}
        self.resets = 0

    def apply_model(self, fn):
        fn(SimpleNamespace(load_weights=lambda weights: self.loaded.update(dict(weights))))

    def reset_prefix_cache(self):
        self.resets += 1


def engine_with_fake() -> VLLMEngine:
    engine = VLLMEngine.__new__(VLLMEngine)  # skips vLLM's constructor
    engine.llm = FakeLLM()
    return engine


def test_sync_weights_pushes_plain_names_and_resets_the_prefix_cache():
    model = tiny_model()
    engine = engine_with_fake()
    engine.sync_weights(model)
    assert engine.llm.resets == 1
    assert engine.llm.loaded.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(engine.llm.loaded[name], value), name


def test_sync_weights_merges_lora_into_copies():
    base = tiny_model()
    model = apply_lora(tiny_model(), r=2, alpha=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    engine = engine_with_fake()
    engine.sync_weights(model)
    assert engine.llm.loaded.keys() == base.state_dict().keys()  # no adapter or "base_model." names
    assert any("lora_A" in n for n, _ in model.named_parameters())  # merged into copies; the model keeps adapters
    q = "model.layers.0.self_attn.q_proj.weight"
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = layer.base_layer.weight + layer.scaling["default"] * layer.lora_B["default"].weight @ \
        layer.lora_A["default"].weight
    torch.testing.assert_close(engine.llm.loaded[q], expected)
