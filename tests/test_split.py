import torch
from torch import nn

import qdiff
from qdiff import QuantConv2d, QuantSpec


def _concat_error(split):
    torch.manual_seed(0)
    decoder = torch.randn(64, 8, 4, 4) * 0.1  # narrow decoder features
    skip = torch.randn(64, 8, 4, 4) * 20.0  # wide skip features: a bimodal concat
    x = torch.cat([decoder, skip], dim=1)
    conv = nn.Conv2d(16, 8, 1)
    layer = QuantConv2d(conv, QuantSpec(8, True, "channel"), QuantSpec(8), split=split)
    for q, part in zip(layer.act_quantizer, layer.input_parts(x), strict=True):
        q.init_from(part)
    xq = layer.quantize_input(x)
    return ((xq - x)[:, :8].pow(2).mean() / decoder.pow(2).mean()).item(), layer


def test_split_lowers_quantization_error_of_a_bimodal_concat():
    err_joint, _ = _concat_error(None)
    err_split, layer = _concat_error(8)
    assert err_split < 0.01 * err_joint  # the narrow half no longer lives on the wide half's grid
    assert len(layer.weight_quantizer) == 2 and len(layer.act_quantizer) == 2
    # The weight is split along input channels, each half with its own per-channel grid.
    assert layer.weight_parts()[0].shape == (8, 8, 1, 1)
    assert layer.quantized_weight().shape == layer.weight.shape


def test_split_points_match_the_actual_concatenations(tiny_unet, tiny_cond_unet):
    for unet in (tiny_unet, tiny_cond_unet):
        splits = qdiff.find_skip_concats(unet)
        seen = {}

        def capture(i, seen=seen):
            def hook(_mod, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                res = args[1] if len(args) > 1 else kwargs["res_hidden_states_tuple"]
                seen[i] = (hidden.shape[1], [r.shape[1] for r in res])

            return hook

        for i, block in enumerate(unet.up_blocks):
            block.register_forward_pre_hook(capture(i), with_kwargs=True)
        x = torch.randn(1, unet.config.in_channels, 8, 8)
        cond = {"encoder_hidden_states": torch.randn(1, 3, 16)} if "Condition" in type(unet).__name__ else {}
        unet(x, torch.tensor([10]), **cond)
        expected = {}
        for i, (decoder, skips) in seen.items():
            for j, resnet in enumerate(unet.up_blocks[i].resnets):
                expected[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = decoder
                assert decoder + skips[-(j + 1)] == resnet.in_channels
                decoder = resnet.out_channels
        assert splits == expected


def test_prepare_applies_split_only_when_asked(tiny_unet):
    import copy

    on = qdiff.prepare(copy.deepcopy(tiny_unet), qdiff.QConfig(split_shortcut=True))
    off = qdiff.prepare(copy.deepcopy(tiny_unet), qdiff.QConfig(split_shortcut=False))
    name = next(iter(qdiff.find_skip_concats(tiny_unet)))
    assert on.get_submodule(name).split is not None
    assert off.get_submodule(name).split is None
