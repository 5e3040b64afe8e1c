"""serving.lora_routing on a tiny random Llama: every row gets its own adapter's products and nothing else."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

ROWS = [None, "a", "b", "a", None, "b"]  # base rows and two adapters, interleaved


def _tiny_peft(dtype, *, dora: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).to(dtype).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # init_lora_weights=False: random B as well as A, so that every adapter changes every row it runs on;
        # different ranks and alphas, so that each adapter's own scale is used.
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                                use_dora=dora), adapter_name="a")
        peft.add_adapter("b", LoraConfig(r=8, lora_alpha=3, target_modules=targets, init_lora_weights=False))
    return peft.eval()


def _ids(positions: int):
    return torch.randint(0, 128, (len(ROWS), positions), generator=torch.Generator().manual_seed(1))


def _logits(peft, ids, **kwargs):
    with torch.inference_mode():
        return peft(input_ids=ids, **kwargs).logits


def _peft_alone(peft, ids) -> dict:
    """Logits of the whole batch with peft's own forward: each adapter active in turn, and adapters off."""
    out = {}
    for name in ("a", "b"):
        peft.set_adapter(name)
        out[name] = _logits(peft, ids)
    with peft.disable_adapter():
        out[None] = _logits(peft, ids)
    assert not torch.equal(out["a"], out[None]) and not torch.equal(out["b"], out[None])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_small_calls_give_each_row_exactly_peft_s_numbers_for_its_adapter(dtype):
    from serving.lora_routing import LARGE_CALL, LoraRouting

    peft = _tiny_peft(dtype)
    ids = _ids(7)
    assert ids.numel() <= LARGE_CALL
    alone = _peft_alone(peft, ids)
    routing = LoraRouting()
    assert routing.install(peft)
    with routing.rows(ROWS):
        mixed = _logits(peft, ids)
    for i, name in enumerate(ROWS):
        assert torch.equal(mixed[i], alone[name][i]), (i, name)
    with routing.rows(["a"] * len(ROWS)):
        assert torch.equal(_logits(peft, ids), alone["a"])
    with routing.rows([None] * len(ROWS)):
        assert torch.equal(_logits(peft, ids), alone[None])


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 0.1)], ids=["fp32", "bf16"])
def test_large_calls_mask_exactly_and_stay_close_to_peft(dtype, tolerance):
    from serving.lora_routing import LARGE_CALL, LoraRouting

    peft = _tiny_peft(dtype)
    ids = _ids(60)
    assert ids.numel() > LARGE_CALL
    alone = _peft_alone(peft, ids)
    routing = LoraRouting()
    assert routing.install(peft)
    ours = {}
    for name in ("a", "b", None):
        with routing.rows([name] * len(ROWS)):
            ours[name] = _logits(peft, ids)
    with routing.rows(ROWS):
        mixed = _logits(peft, ids)
    assert torch.equal(ours[None], alone[None])  # no adapter: the base layers alone
    for i, name in enumerate(ROWS):
        assert torch.equal(mixed[i], ours[name][i]), (i, name)  # the row mask changes no bit
    for name in ("a", "b"):  # the product in the model's dtype, added in place: close to peft's fp32 product
        torch.testing.assert_close(ours[name].float(), alone[name].float(), rtol=tolerance, atol=tolerance)


def test_reset_gives_the_layers_peft_s_forward_back():
    from serving.lora_routing import LoraRouting

    peft = _tiny_peft(torch.float32)
    ids = _ids(7)
    peft.set_adapter("a")
    before = _logits(peft, ids)
    routing = LoraRouting()
    assert routing.install(peft)
    layers = routing._layers
    forward = layers[0].forward
    assert routing.install(peft) and layers[0].forward is forward  # once per peft model
    assert all("forward" in layer.__dict__ for layer in layers)
    with pytest.raises(RuntimeError), routing.rows(["a"] * len(ROWS)):
        raise RuntimeError("the forward failed")
    assert routing._plan == []  # no mask outlives its forward
    routing.reset()
    assert not any("forward" in layer.__dict__ or hasattr(layer, "_serving_weights") for layer in layers)
    assert torch.equal(_logits(peft, ids), before)


def test_dora_layers_keep_peft_s_forward():
    from serving.lora_routing import LoraRouting

    peft = _tiny_peft(torch.float32, dora=True)
    routing = LoraRouting()
    assert not routing.install(peft)
    assert routing._layers is None and not any("forward" in m.__dict__ for m in peft.modules() if hasattr(m, "lora_A"))


@pytest.mark.parametrize("change", ["fan_in_fan_out", "merged", "no input cast", "lora bias", "variant"])
def test_a_layer_that_is_not_plain_lora_keeps_peft_s_forward(change):
    from serving.lora_routing import _lora_layers, _plain

    peft = _tiny_peft(torch.float32)
    layer = _lora_layers(peft)[0]
    assert _plain(layer)
    if change == "fan_in_fan_out":
        layer.fan_in_fan_out = True
    elif change == "merged":
        layer.merge(adapter_names=["a"])
    elif change == "no input cast":
        layer.cast_input_dtype_enabled = False
    elif change == "lora bias":
        layer.lora_B["b"].bias = torch.nn.Parameter(torch.zeros(layer.lora_B["b"].out_features))
    else:
        layer.lora_variant = {"a": object()}
    assert not _plain(layer)


def test_a_call_of_exactly_large_call_positions_still_gets_peft_s_exact_numbers():
    from serving.lora_routing import LARGE_CALL, LoraRouting

    peft = _tiny_peft(torch.bfloat16)
    ids = torch.randint(0, 128, (4, LARGE_CALL // 4), generator=torch.Generator().manual_seed(2))
    peft.set_adapter("a")
    alone = _logits(peft, ids)
    routing = LoraRouting()
    assert routing.install(peft)
    with routing.rows(["a"] * 4):
        assert torch.equal(_logits(peft, ids), alone)  # the small-call path: bit for bit
