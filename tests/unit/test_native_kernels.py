"""The decoding engine's native kernels (models/native.py): each against a float64 reference and against
the torch operators they replace, the engine's logits with and without them, and the fallback when they
cannot be built."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from tunery.models import native

SUPPORTED = bool(torch.cpu._is_avx512_bf16_supported()) and shutil.which("cc") is not None
needs_kernels = pytest.mark.skipif(not SUPPORTED, reason="no AVX-512 BF16 or no C compiler on this machine")


@pytest.fixture(scope="module")
def kernels() -> native.Kernels:
    built = native.decode_kernels()
    assert built is not None, "AVX-512 BF16 and a compiler are here, so the kernels must build"
    return built


def cache_views(batch: int, kv: int, n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values laid out as the engine reads them: views of one (layers, batch, 2 kv, length, D)
    cache, longer than the keys read."""
    generator = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, batch, 2 * kv, n + 7, dim, generator=generator).to(torch.bfloat16)
    visible = cache[1, :, :, :n]
    return visible[:, :kv], visible[:, kv:]


@needs_kernels
@pytest.mark.parametrize(
    ("batch", "kv", "group", "dim", "n"),
    [
        (1, 3, 3, 64, 1),
        (16, 3, 3, 64, 200),
        (2, 2, 4, 128, 37),
        (3, 1, 7, 128, 130),
        (2, 4, 1, 32, 16),
        (1, 2, 8, 64, 333),
    ],
)
def test_attention_matches_a_float64_reference_as_closely_as_sdpa(kernels, batch, kv, group, dim, n) -> None:
    generator = torch.Generator().manual_seed(batch * 1000 + n)
    keys, values = cache_views(batch, kv, n, dim, seed=n)
    qkv = (torch.randn(batch, kv * group + 2 * kv, 1, dim, generator=generator) * 0.5).to(torch.bfloat16)
    queries = qkv[:, : kv * group].view(batch, kv, group, dim)  # strided across rows, as in a step
    bias = torch.zeros(batch, 1, 1, n + 5)[..., :n]
    bias[0, ..., : n // 3] = float("-inf")  # a left-padded row: its first keys masked
    out = kernels.attend(queries, keys, values, bias)
    weights = torch.softmax(queries.double() @ keys.double().transpose(-1, -2) + bias.double(), -1)
    reference = weights @ values.double()
    sdpa = F.scaled_dot_product_attention(queries, keys, values, attn_mask=bias, scale=1.0)
    error, sdpa_error = (out.double() - reference).abs().max(), (sdpa.double() - reference).abs().max()
    bf16_half_ulp = reference.abs().max() / 256
    assert error <= bf16_half_ulp * 1.05, (error, sdpa_error)
    assert error <= sdpa_error * 1.5 + 1e-3


@needs_kernels
def test_add_rms_norm_rounds_the_residual_as_bf16_adds_and_norms_like_torch(kernels) -> None:
    generator = torch.Generator().manual_seed(0)
    for rows, width in [(1, 576), (16, 576), (700, 200), (3, 40)]:
        x = (torch.randn(rows, width, generator=generator) * 3).to(torch.bfloat16)
        delta = torch.randn(rows, width, generator=generator).to(torch.bfloat16)
        weight = (torch.rand(width, generator=generator) + 0.5).to(torch.bfloat16)
        summed = x + delta
        out = kernels.add_rms_norm(x, delta, weight, 1e-5)
        assert torch.equal(x, summed)  # x += delta in place, rounded as torch's bf16 add
        reference = F.rms_norm(summed.double(), (width,), weight.double(), 1e-5)
        torch_error = (F.rms_norm(summed, (width,), weight, 1e-5).double() - reference).abs().max()
        assert (out.double() - reference).abs().max() <= torch_error * 1.01 + 1e-6
        alone = kernels.add_rms_norm(summed, None, weight, 1e-5)
        assert torch.equal(alone, out) and torch.equal(x, summed)


@needs_kernels
def test_silu_mul_is_at_least_as_close_to_float64_as_torchs_two_operators(kernels) -> None:
    generator = torch.Generator().manual_seed(1)
    for rows, width in [(1, 1536), (16, 1536), (5, 40)]:
        gate_up = (torch.randn(rows, 2 * width, generator=generator) * 4).to(torch.bfloat16)
        gate_up[0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # the exponential's clamps
        gate, up = gate_up.chunk(2, -1)
        out = kernels.silu_mul(gate_up)
        reference = F.silu(gate.double()) * up.double()
        torch_error = (F.silu(gate).mul(up).double() - reference).abs().max()
        assert (out.double() - reference).abs().max() <= torch_error + 1e-6
        assert torch.isfinite(out).all()


@needs_kernels
def test_rope_store_rotates_queries_and_keys_and_stores_keys_and_values(kernels) -> None:
    generator = torch.Generator().manual_seed(2)
    batch, heads, kv, dim = 3, 6, 2, 64
    qkv = torch.randn(batch, heads + 2 * kv, 1, dim, generator=generator).to(torch.bfloat16)
    angles = torch.rand(batch, dim // 2, generator=generator) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(torch.bfloat16)
    sin = torch.cat([-angles.sin(), angles.sin()], -1).to(torch.bfloat16)
    cache = torch.zeros(2, batch, 2 * kv, 9, dim, dtype=torch.bfloat16)
    slot = cache[1, :, :, 4:5]
    queries = kernels.rope_store(qkv, cos, sin, slot)
    x = qkv[:, :, 0].double()
    rotated = x * cos[:, None].double() + x.roll(dim // 2, -1) * sin[:, None].double()
    assert (queries.double() - rotated[:, :heads]).abs().max() <= rotated.abs().max() / 256
    assert (
        slot[:, :kv, 0].double() - rotated[:, heads : heads + kv]
    ).abs().max() <= rotated.abs().max() / 256
    assert torch.equal(slot[:, kv:, 0], qkv[:, heads + kv :, 0])  # values as they are
    assert cache[0].abs().sum() == 0 and cache[1, :, :, :4].abs().sum() == 0  # nothing else written


def _amx_granted() -> bool:
    """The CPU has AMX tiles and Linux lets this process use them (asked as the kernels' library asks,
    without building it at collection)."""
    if not (SUPPORTED and {"amx_bf16", "amx_tile"} <= set(native._cpu_flags().split())):
        return False
    import ctypes
    import platform

    if platform.machine() != "x86_64":
        return False
    # arch_prctl (158 on x86-64): ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18)
    return int(ctypes.CDLL(None).syscall(158, 0x1023, 18)) == 0


needs_tiles = pytest.mark.skipif(
    not _amx_granted(), reason="no AMX tiles on this machine or for this process"
)


@needs_tiles
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 32, 40, 50])
@pytest.mark.parametrize(("out_features", "in_features"), [(48, 64), (64, 96), (16, 32)])
def test_tiled_linear_matches_a_float64_reference_as_closely_as_onednn(
    kernels, rows, out_features, in_features
) -> None:
    """Any number of rows (16-row chunks, two at a time, a short last one), an odd number of 16-column
    blocks and a width of several 32-wide slices: every output as close to float64 as torch's bf16 product."""
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
    weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
    exact = x.double() @ weight.double().t()
    tiled = kernels.tile_weight(weight)  # blocks of 16 outputs, each its pairs of inputs side by side
    blocks = weight.view(out_features // 16, 16, in_features // 2, 2).permute(0, 2, 1, 3)
    assert torch.equal(tiled.blocks, blocks)
    out = kernels.linear(x, tiled)
    assert out.shape == (rows, out_features) and out.dtype == torch.bfloat16
    torch_error = (F.linear(x, weight).double() - exact).abs()
    error = (out.double() - exact).abs()
    assert error.max() <= torch_error.max() * 1.01 + 1e-6, (error.max(), torch_error.max())
    assert error.mean() <= torch_error.mean() * 1.05
    # leading dimensions are kept
    assert torch.equal(kernels.linear(x.view(1, rows, in_features), kernels.tile_weight(weight))[0], out)


@needs_tiles
def test_tiled_linear_refuses_what_it_cannot_read(kernels) -> None:
    weight = torch.randn(32, 64).to(torch.bfloat16)
    tiled = kernels.tile_weight(weight)
    for bad in (
        torch.randn(2, 32).to(torch.bfloat16),  # the wrong width
        torch.randn(2, 64),  # fp32
    ):
        with pytest.raises(ValueError, match="native linear"):
            kernels.linear(bad, tiled)
    strided = torch.randn(2, 128).to(torch.bfloat16)[:, ::2]  # not contiguous: read from a copy
    assert torch.equal(kernels.linear(strided, tiled), kernels.linear(strided.contiguous(), tiled))
    for shape in ((24, 64), (32, 48)):  # not whole blocks of 16 outputs and 32 inputs
        assert not native.tiles_fit(*shape)
        with pytest.raises(ValueError, match="native linear"):
            kernels.tile_weight(torch.randn(shape).to(torch.bfloat16))


@needs_kernels
def test_tensors_laid_out_otherwise_are_refused_not_read(kernels) -> None:
    keys, values = cache_views(2, 2, 10, 64, seed=0)
    queries = torch.zeros(2, 2, 3, 64, dtype=torch.bfloat16)
    bias = torch.zeros(2, 1, 1, 10)
    with pytest.raises(ValueError):
        kernels.attend(queries, keys, values, bias[..., :9])  # a mask shorter than the keys
    with pytest.raises(ValueError):
        kernels.attend(queries.float(), keys, values, bias)
    with pytest.raises(ValueError):
        kernels.add_rms_norm(
            torch.zeros(4, 8, dtype=torch.bfloat16).t(), None, torch.ones(4, dtype=torch.bfloat16), 1e-5
        )
    with pytest.raises(ValueError):
        kernels.silu_mul(torch.zeros(4, 7, dtype=torch.bfloat16))


@needs_kernels
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_engine_logits_with_the_kernels_are_as_close_to_fp32_as_without(kernels, monkeypatch, family) -> None:
    """The whole step on the kernels (with AMX: one call, tiled weights; Qwen3's per-head norms too)
    against an fp32 engine, as close as torch's operators get."""
    from transformers import AutoModelForCausalLM

    from tunery.models.decode import DecodeModel
    from tunery.models.tiny import tiny_config

    config = tiny_config(300, family)
    config.head_dim = 32  # the attention kernel takes head widths in multiples of 32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    if family == "qwen3":  # its query and key norms start as ones: make them matter
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "q_norm" in name or "k_norm" in name:
                    parameter.add_(torch.randn_like(parameter) * 0.3)
    fp32 = DecodeModel(model, dtype=torch.float32)
    engine = DecodeModel(model, dtype=torch.bfloat16)
    assert engine.kernels is not None  # the kernels are what is under test
    batch, length, steps = 3, 9, 12
    ids = torch.randint(3, 300, (batch, length + steps), generator=torch.Generator().manual_seed(0))

    def logits(model_engine: DecodeModel) -> torch.Tensor:
        cache = model_engine.new_cache(batch, length + steps)
        valid = torch.ones(batch, length, dtype=torch.bool)
        valid[0, :4] = False  # a left-padded row
        positions = (valid.cumsum(-1) - 1).clamp(min=0)
        bias = torch.zeros(batch, 1, 1, length + steps)
        bias[0, ..., :4] = float("-inf")
        out = [model_engine.prefill(ids[:, :length], positions, valid, cache)]
        for i in range(steps):
            step_positions = positions[:, -1] + 1 + i
            out.append(model_engine.step(ids[:, length + i], step_positions, cache, length + i, bias))
        return torch.stack(out)

    if kernels.tiles:  # the vocabulary (300) is not whole blocks of 16, so the head stays oneDNN's
        assert isinstance(engine.layers[0]["gate_up"], native.TiledWeight)
        assert not isinstance(engine.head, native.TiledWeight)
    reference = logits(fp32)
    with_kernels = logits(engine)
    monkeypatch.setattr(native, "decode_kernels", lambda: None)
    without = logits(DecodeModel(model, dtype=torch.bfloat16))
    error, torch_error = (with_kernels - reference).abs().mean(), (without - reference).abs().mean()
    assert error <= torch_error * 1.5, (error, torch_error)
    assert (with_kernels.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


def stack_engine(family: str):  # type: ignore[no-untyped-def]
    """A tiny bf16 engine of `family` whose layers the native stack takes (32-wide heads), each layer's
    norms and biases its own (they start as ones and zeros)."""
    from transformers import AutoModelForCausalLM

    from tunery.models.decode import DecodeModel
    from tunery.models.tiny import tiny_config

    config = tiny_config(320, family)
    config.head_dim = 32  # the attention kernel takes head widths in multiples of 32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model, DecodeModel(model, dtype=torch.bfloat16)


def stepped_logits(engine, adapter=None, batch: int = 3) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Prefill of 9 tokens (one row left-padded) then 15 steps of `batch` rows: every position's logits."""
    length, steps = 9, 15
    ids = torch.randint(3, 320, (batch, length + steps), generator=torch.Generator().manual_seed(1))
    cache = engine.new_cache(batch, length + steps)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :5] = False
    positions = (valid.cumsum(-1) - 1).clamp(min=0)
    bias = torch.zeros(batch, 1, 1, length + steps)
    bias[1, ..., :5] = float("-inf")
    out = [engine.prefill(ids[:, :length], positions, valid, cache, adapter)]
    for i in range(steps):
        step_positions = positions[:, -1] + 1 + i
        out.append(engine.step(ids[:, length + i], step_positions, cache, length + i, bias, adapter))
    return torch.stack(out)


@needs_tiles
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "phi3", "qwen3"])
@pytest.mark.parametrize("batch", [3, 20])
def test_a_step_in_one_native_call_gives_the_per_operator_steps_logits_exactly(
    kernels, family, batch
) -> None:
    """`decode_layers` runs the kernels the per-operator step runs, in the same order, so the logits are the
    same bit for bit: Qwen2's q|k|v bias, Mistral's window (crossed: 16 slots, 24 written), Phi-3's fused
    projections, Qwen3's per-head query and key norms; 20 rows are a chunk of 16 and a short one."""
    _, engine = stack_engine(family)
    assert engine.stack is not None
    one_call = stepped_logits(engine, batch=batch)
    engine.stack = None
    per_operator = stepped_logits(engine, batch=batch)
    assert torch.isfinite(one_call).all()
    assert torch.equal(one_call, per_operator)


@needs_tiles
def random_adapter(model, engine, rank: int = 4, scale: float = 0.3):  # type: ignore[no-untyped-def]
    """LoRA factors of `rank` on every projection of `model`'s layers, as `engine` serves them."""
    generator = torch.Generator().manual_seed(5)
    updates = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            a = torch.randn(rank, module.in_features, generator=generator) * scale
            b = torch.randn(module.out_features, rank, generator=generator) * scale
            updates[name] = [(a, b, 2.0)]
    adapter = engine.adapter(updates)
    assert not isinstance(adapter, str)
    return adapter


@needs_tiles
@pytest.mark.parametrize(
    ("family", "batch", "rank"),
    [("llama", 3, 4), ("qwen2", 3, 4), ("phi3", 3, 4), ("qwen3", 3, 4), ("llama", 20, 80)],
)
def test_an_adapter_beside_the_weights_in_the_one_call_step(kernels, family, batch, rank) -> None:
    """An adapter's updates on every projection, served beside the shared weights: the one-call step
    against the per-operator one (whose fp32 products sum in another order, so within rounding), and the
    adapter's effect many times that difference (a step that left an update out would fail). 20 rows and
    rank 80 take the 16-row sums, a short chunk and x @ a shared over the threads."""
    model, engine = stack_engine(family)
    adapter = random_adapter(model, engine, rank, 0.3 if rank < 16 else 0.1)
    base = stepped_logits(engine, batch=batch)
    one_call = stepped_logits(engine, adapter, batch)
    stack, engine.stack = engine.stack, None
    per_operator = stepped_logits(engine, adapter, batch)
    engine.stack = stack
    assert stack is not None and adapter.native["stack"].updates is adapter.layers  # it ran the stack
    difference = (one_call - per_operator).abs().mean()
    effect = (per_operator - base).abs().mean()
    assert difference < 0.02 * effect, (difference, effect)
    assert (one_call.argmax(-1) == per_operator.argmax(-1)).float().mean() >= 0.95


@needs_tiles
def test_an_adapters_stack_follows_the_engines_weights_and_keeps_none_alive(kernels) -> None:
    """After the weights change (an optimizer step), the engine's new stack gets the adapter's updates
    anew, and the adapter's cached stack does not keep the old weights alive (a served adapter outlives the
    model it was used with when the worker evicts that model)."""
    import gc
    import weakref

    model, engine = stack_engine("llama")
    adapter = random_adapter(model, engine)
    stepped_logits(engine, adapter)
    old = weakref.ref(engine.layers[0]["gate_up"].blocks)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight.mul_(2.0)
    engine.refresh()
    gc.collect()
    assert old() is None  # neither the old stack nor the adapter's holds the old weights
    before = adapter.native["stack"]
    assert not before.alive()  # and refused if used
    x, cache, bias = torch.randn(1, 64).to(torch.bfloat16), engine.new_cache(1, 4), torch.zeros(1, 1, 1, 4)
    cos, sin = engine.cos[:1].contiguous(), engine.sin[:1].contiguous()
    with pytest.raises(ValueError, match="native decoder layers"):
        kernels.decode_layers(x, cos, sin, cache, 0, bias, before)
    stepped_logits(engine, adapter)
    assert adapter.native["stack"] is not before and adapter.native["stack"].alive()


@needs_tiles
def test_the_one_call_step_refuses_what_it_cannot_read(kernels) -> None:
    model, engine = stack_engine("llama")
    stack = engine.stack
    assert stack is not None
    batch, length = 2, 8
    x = torch.randn(batch, 64).to(torch.bfloat16)
    cos, sin = engine.cos[:batch].contiguous(), engine.sin[:batch].contiguous()
    cache = engine.new_cache(batch, length)
    bias = torch.zeros(batch, 1, 1, length)
    kernels.decode_layers(x.clone(), cos, sin, cache, 3, bias, stack)  # as laid out: runs
    for bad in (
        dict(cache=engine.new_cache(batch + 1, length)),  # another batch
        dict(index=length),  # past the cache
        dict(bias=torch.zeros(batch, 1, 1, 3)),  # does not reach the slot
        dict(cos=torch.zeros(batch, 16, dtype=torch.bfloat16)),  # not the heads' width (32)
        dict(x=torch.randn(batch, 64)),  # fp32
    ):
        arguments = dict(x=x.clone(), cos=cos, sin=sin, cache=cache, index=3, bias=bias) | bad
        with pytest.raises(ValueError, match="native decoder layers"):
            kernels.decode_layers(stack=stack, **arguments)
    assert kernels.layer_stack([], [], stack.shape) is None  # no layers: nothing to run
    updates = [{} for _ in engine.layers]
    a, b = engine.adapter(
        {"model.layers.0.mlp.down_proj": [(torch.randn(4, 128), torch.randn(64, 4), 1.0)]}
    ).layers[0]["down"]
    for bad_update in ((a.t(), b), (a, b[:3]), (a.double(), b)):  # strided, another rank, fp64
        updates[0] = {"down": bad_update}
        with pytest.raises(ValueError, match="adapter's down update"):
            kernels.adapter_stack(stack, updates)


@needs_tiles
def test_without_amx_the_engine_keeps_onednns_products_and_the_per_operator_step(
    kernels, monkeypatch
) -> None:
    """A CPU with AVX-512 BF16 but no AMX tiles (or a process Linux does not grant them): oneDNN's packed
    weights and the per-operator step, with the same answers to within bf16 rounding."""
    monkeypatch.setattr(kernels, "tiles", False)
    _, plain = stack_engine("llama")
    assert plain.stack is None and not isinstance(plain.layers[0]["qkv"], native.TiledWeight)
    monkeypatch.setattr(kernels, "tiles", True)
    _, tiled = stack_engine("llama")
    assert tiled.stack is not None
    without, with_tiles = stepped_logits(plain), stepped_logits(tiled)
    assert (without - with_tiles).abs().mean() < 0.05
    assert (without.argmax(-1) == with_tiles.argmax(-1)).float().mean() >= 0.9


def test_without_a_build_the_engine_keeps_torchs_operators(
    monkeypatch, tmp_path, caplog, tunery_home
) -> None:
    native.decode_kernels.cache_clear()
    try:
        monkeypatch.setenv("TUNERY_NATIVE_KERNELS", "0")
        assert native.decode_kernels() is None
        native.decode_kernels.cache_clear()
        monkeypatch.delenv("TUNERY_NATIVE_KERNELS")
        broken = tmp_path / "decode.c"
        broken.write_text("this is not C\n")
        monkeypatch.setattr(native, "SOURCE", broken)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
        monkeypatch.setattr(native.shutil, "which", lambda name: "/usr/bin/cc" if SUPPORTED else None)
        with caplog.at_level("INFO", logger="tunery.models.native"):
            assert native.decode_kernels() is None
        if SUPPORTED:
            assert "could not be built" in caplog.text
            assert not list(tunery_home.glob("native/.decode-*"))  # no partial library left behind
    finally:
        native.decode_kernels.cache_clear()


@needs_kernels
def test_a_new_build_removes_other_versions_libraries_a_day_old(monkeypatch, tmp_path, tunery_home) -> None:
    import os
    import time

    folder = tunery_home / "native"
    folder.mkdir(parents=True, exist_ok=True)
    old, recent, partial = (
        folder / "decode-0123456789abcdef.so",
        folder / "decode-fedcba9876543210.so",
        folder / ".decode-x.so",
    )
    for path in (old, recent, partial):
        path.write_bytes(b"")
    day_ago = time.time() - native.STALE_SECONDS - 60
    for path in (old, partial):
        os.utime(path, (day_ago, day_ago))
    source = tmp_path / "decode.c"
    source.write_text("int tunery_nothing(void) { return 0; }\n")  # a new version: its own library
    monkeypatch.setattr(native, "SOURCE", source)
    built = native._build(shutil.which("cc") or "gcc")
    assert built.is_file() and recent.is_file()  # a day not yet passed: another version may still start
    assert not old.exists() and not partial.exists()
    assert native._build(shutil.which("cc") or "gcc") == built  # built once


@needs_kernels
def test_training_rms_norm_and_swiglu_gradients_are_as_close_to_float64_as_torchs(kernels) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    generator = torch.Generator().manual_seed(3)
    norm = LlamaRMSNorm(200, eps=1e-5).to(torch.bfloat16).requires_grad_(False)
    norm.weight.copy_(torch.rand(200, generator=generator) + 0.5)
    x = (torch.randn(2, 37, 200, generator=generator) * 2).to(torch.bfloat16).requires_grad_(True)
    grad = torch.randn(2, 37, 200, generator=generator).to(torch.bfloat16)
    exact = x.detach().double().requires_grad_(True)
    (norm.weight.double() * exact * torch.rsqrt(exact.pow(2).mean(-1, keepdim=True) + 1e-5)).backward(
        grad.double()
    )
    norm(x).backward(grad)
    torch_error = (x.grad.double() - exact.grad).abs().max()
    x.grad = None
    native._RmsNorm.apply(x, norm.weight, 1e-5, kernels).backward(grad)
    assert (x.grad.double() - exact.grad).abs().max() <= torch_error * 1.01

    gate = (torch.randn(37, 300, generator=generator) * 3).to(torch.bfloat16).requires_grad_(True)
    up = torch.randn(37, 300, generator=generator).to(torch.bfloat16).requires_grad_(True)
    grad = torch.randn(37, 300, generator=generator).to(torch.bfloat16)
    exact_gate, exact_up = (
        gate.detach().double().requires_grad_(True),
        up.detach().double().requires_grad_(True),
    )
    (F.silu(exact_gate) * exact_up).backward(grad.double())
    (F.silu(gate) * up).backward(grad)
    torch_errors = [(t.grad.double() - e.grad).abs().max() for t, e in ((gate, exact_gate), (up, exact_up))]
    gate.grad = up.grad = None
    native._SiluMul.apply(gate, up, kernels).backward(grad)
    for t, e, torch_error in zip((gate, up), (exact_gate, exact_up), torch_errors, strict=True):
        assert (t.grad.double() - e.grad).abs().max() <= torch_error * 1.01

    # gate and up side by side in one tensor (a joined gate|up projection's output): the same numbers
    gate_up = torch.cat([gate.detach(), up.detach()], 1).requires_grad_(True)
    product = native.joined_swiglu(gate_up)
    assert product is not None and torch.equal(product, native._SiluMul.apply(gate, up, kernels))
    product.backward(grad)
    assert torch.equal(gate_up.grad, torch.cat([gate.grad, up.grad], 1))


@needs_kernels
def test_a_bf16_lora_models_loss_and_gradients_with_native_layers_match_its_own(kernels) -> None:
    from tunery.models.lora import apply_lora, cast_frozen
    from tunery.models.tiny import tiny_model

    def loss_and_grads(switch: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        torch.manual_seed(0)
        model = apply_lora(tiny_model(300, seed=1), 4, 8, 0.0, "all-linear")
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.2)
        cast_frozen(model, torch.bfloat16)
        switched = native.native_layers(model) if switch else 0
        ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, switched

    base_loss, base_grads, _ = loss_and_grads(False)
    loss, grads, switched = loss_and_grads(True)
    assert switched == 2 * 2 + 1 + 2  # two layers' two norms, the final norm, two MLPs
    assert abs(loss - base_loss) <= 0.01 * abs(base_loss)
    assert grads.keys() == base_grads.keys()
    for name, g in grads.items():
        scale = base_grads[name].abs().max()
        assert (g - base_grads[name]).abs().max() <= 0.05 * scale + 1e-6, name
