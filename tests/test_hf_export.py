"""torch.export of the AHA models: a forward pass, and decode steps into a StaticCache (transformers'
ExecuTorch recipe), compared with eager.

The model side (the batch description, the static cache's cache_seqlens, the plain path) holds no
data-dependent Python branch, so export works wherever the attention itself traces: the plain path of
attn_implementation="eager", the triton backend, and aha's default CPU backends (torch, cpu, reference),
whose value-dependent code each runs as one opaque custom op while tracing (aha.torch_ops.opaque_attention).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import aha  # noqa: E402
from aha.hf import FAOlmoConfig, FAOlmoForCausalLM  # noqa: E402
from aha.nn import set_backend  # noqa: E402
from aha_tiny import one_thread  # noqa: E402, F401

TINY = dict(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=None)  # fmt: skip


def faolmo(path: str):
    """A tiny FAOlmo (head_dim 16) whose routers pick a mix of All and Here, computing attention by ``path``."""
    torch.manual_seed(0)
    m = FAOlmoForCausalLM(FAOlmoConfig(local_window_size=3, **TINY)).eval()
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight[-TINY["num_attention_heads"] :].normal_(0.0, 1.0)
    aha.backends()  # loaded before tracing
    if path == "eager attention":
        m.set_attn_implementation("eager")
    else:
        set_backend(m, path)
    return m


def tokens(length=10, seed=0):
    return torch.randint(3, 100, (2, length), generator=torch.Generator().manual_seed(seed))


def _export_and_compare(path: str, strict: bool):
    m = faolmo(path)
    program = torch.export.export(m, (tokens(),), {"use_cache": False}, strict=strict)
    for seed in (0, 1):  # the program is not specialised to the tokens it was traced with
        x = tokens(seed=seed)
        with torch.no_grad():
            want = m(x, use_cache=False).logits
        torch.testing.assert_close(program.module()(x, use_cache=False).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("path", ["eager attention", "triton"])
def test_an_exported_forward_gives_the_eager_logits(path, strict):
    if path == "triton":
        pytest.importorskip("triton")
    _export_and_compare(path, strict)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
def test_an_exported_forward_on_the_default_cpu_backends(backend, strict):
    _export_and_compare(backend, strict)


def test_exported_decode_steps_into_a_static_cache_give_the_greedy_tokens():
    """transformers' ExecuTorch recipe: one token a step, the cache as the program's buffers."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    m = faolmo("eager attention")
    m.generation_config.cache_implementation = "static"
    x = tokens()[:1, :6]
    want = m.generate(x, max_new_tokens=6, do_sample=False)
    recipe = TorchExportableModuleWithStaticCache(m, batch_size=1, max_cache_len=16)
    step = torch.export.export(recipe, (), {"input_ids": x[:, :1], "cache_position": torch.tensor([0])}).module()
    seq = x
    with torch.no_grad():
        for pos in range(want.shape[1] - 1):  # the prompt one token at a time, then each new token
            logits = step(input_ids=seq[:, pos : pos + 1], cache_position=torch.tensor([pos]))
            if pos + 1 >= seq.shape[1]:
                seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq, want)
