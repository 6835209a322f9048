"""PAST model: shapes, masking, graph branch, weight loading, gradients, FLOP estimate (CPU, tiny)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from common.errors import InputError
from pretrain.models import (
    IMAGE_PRESETS,
    build_model,
    build_neighbour_graph,
    compile_towers,
    create_backbone,
    estimate_flops_per_sample,
    prepare_host_batch,
    resolve_model_config,
)

VOCAB = 80
CONTEXT = 16
IMAGE_KWARGS = {"img_size": 32, "patch_size": 16, "depth": 2, "embed_dim": 64, "num_heads": 2}
TINY = {
    "image": {"arch": "vit_tiny_patch16_224", "kwargs": IMAGE_KWARGS},
    "cell": {"dim": 32, "heads": 4, "ff_dim": 64, "layers": 2, "context_length": CONTEXT, "vocab_size": VOCAB},
    "graph": {"node_encoder": "transformer", "gat_layers": 2, "gat_heads": 2, "hidden": 16, "radius_um": 25.0},
    "fusion": {"heads": 4},
    "proj_dim": 8,
}


def tiny_cfg(**graph) -> dict:
    cfg = copy.deepcopy(TINY)
    cfg["graph"].update(graph)
    return cfg


def make_tokens(n: int, lengths: list[int] | None = None, seed: int = 0) -> torch.Tensor:
    """(n, CONTEXT) rows: 3 assay/modality/organism ids, distinct gene ids, then pad (1)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.ones(n, CONTEXT, dtype=torch.long)
    for row in range(n):
        length = CONTEXT if lengths is None else lengths[row]
        tokens[row, :3] = torch.tensor([9, 4, 5])
        tokens[row, 3:length] = torch.randperm(VOCAB - 30, generator=g)[: length - 3] + 30
    return tokens


def make_batch(n_cells: int = 3, nbr_counts=(2, 0, 3), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n_nbr = sum(nbr_counts)
    return {
        "image": torch.randn(n_cells, 3, 32, 32, generator=g),
        "tokens": make_tokens(n_cells, [CONTEXT, 7, 11][:n_cells], seed=seed),
        "nbr_tokens": make_tokens(n_nbr, [5 + i % 9 for i in range(n_nbr)], seed=seed + 1),
        "nbr_offsets_um": torch.randn(n_nbr, 2, generator=g) * 12.0,
        "nbr_batch": torch.repeat_interleave(torch.arange(n_cells), torch.tensor(nbr_counts)),
    }


@pytest.fixture(scope="module", params=["tokens", "transformer", "bag"])
def model(request):
    torch.manual_seed(0)
    return build_model({"model": tiny_cfg(node_encoder=request.param)}).eval()


def cell_emb(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_cell(batch["tokens"], batch["nbr_tokens"], batch["nbr_offsets_um"], batch["nbr_batch"])


def test_forward_shapes_and_unit_norm(model):
    with torch.no_grad():
        out = model(make_batch())
    assert out["img_emb"].shape == (3, 8) and out["cell_emb"].shape == (3, 8)
    assert out["img_feat"].shape == (3, 64) and out["cell_feat"].shape == (3, 32) and out["graph_feat"].shape == (3, 32)
    for key in ("img_emb", "cell_emb"):
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(3))
    batch = make_batch()
    torch.testing.assert_close(model.encode_image(batch["image"]), out["img_emb"])
    torch.testing.assert_close(cell_emb(model, batch), out["cell_emb"])


def test_without_graph_branch():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(enabled=False)).eval()
    batch = make_batch()
    with torch.no_grad():
        out = model(batch)
    assert model.graph is None and "graph_feat" not in out
    torch.testing.assert_close(out["cell_emb"].norm(dim=-1), torch.ones(3))
    # Neighbours are ignored without the graph branch.
    torch.testing.assert_close(model.encode_cell(batch["tokens"]), out["cell_emb"])


def test_padding_is_masked(model):
    batch = make_batch()  # cell 1 has 7 real tokens, cell 2 has 11
    reference = cell_emb(model, batch)
    after_pad = copy.deepcopy(batch)
    after_pad["tokens"][1, 8:] = torch.arange(8) + 40  # gene ids after the first pad (position 7)
    after_pad["tokens"][2, 12:] = 0
    torch.testing.assert_close(cell_emb(model, after_pad), reference)

    real_changed = copy.deepcopy(batch)
    real_changed["tokens"][1, 5] = 77
    changed = cell_emb(model, real_changed)
    assert not torch.allclose(changed[1], reference[1], atol=1e-4)
    torch.testing.assert_close(changed[[0, 2]], reference[[0, 2]])


@pytest.mark.parametrize("trim", [True, False])
def test_cell_encoder_ignores_padding_with_and_without_trim(trim):
    cfg = tiny_cfg(enabled=False)
    cfg["cell"]["trim_padding"] = trim
    torch.manual_seed(0)
    encoder = build_model(cfg).cell_encoder.eval()
    tokens = make_tokens(2, [6, 9])
    with torch.no_grad():
        alone = encoder(tokens[:1, :6])  # no padding at all
        padded = encoder(tokens)
    torch.testing.assert_close(padded[0], alone[0])


def test_rank_order_matters(model):
    batch = make_batch()
    reference = cell_emb(model, batch)
    swapped = copy.deepcopy(batch)
    swapped["tokens"][0, [4, 9]] = swapped["tokens"][0, [9, 4]]
    assert not torch.allclose(cell_emb(model, swapped)[0], reference[0], atol=1e-4)


def test_cell_without_neighbours(model):
    batch = make_batch(nbr_counts=(2, 0, 3))
    emb = cell_emb(model, batch)
    assert torch.isfinite(emb).all()
    with torch.no_grad():
        no_nbrs = model.encode_cell(batch["tokens"])
    assert torch.isfinite(no_nbrs).all()
    # Cell 1 has no neighbours in the batch either: same graph, same embedding.
    torch.testing.assert_close(no_nbrs[1], emb[1])


def test_neighbours_reach_only_their_own_cell(model):
    batch = make_batch()
    reference = cell_emb(model, batch)
    changed = copy.deepcopy(batch)
    changed["nbr_tokens"][3, 3:5] = torch.tensor([70, 71])  # a neighbour of cell 2
    emb = cell_emb(model, changed)
    assert not torch.allclose(emb[2], reference[2], atol=1e-4)
    torch.testing.assert_close(emb[:2], reference[:2])

    moved = copy.deepcopy(batch)
    moved["nbr_offsets_um"][0] *= 3.0  # a neighbour of cell 0, three times further away
    emb = cell_emb(model, moved)
    assert not torch.allclose(emb[0], reference[0], atol=1e-4)
    torch.testing.assert_close(emb[1:], reference[1:])


def test_neighbour_order_does_not_matter(model):
    batch = make_batch()
    order = torch.tensor([4, 0, 3, 2, 1])
    shuffled = dict(batch, **{k: batch[k][order] for k in ("nbr_tokens", "nbr_offsets_um", "nbr_batch")})
    torch.testing.assert_close(cell_emb(model, shuffled), cell_emb(model, batch), atol=1e-5, rtol=1e-4)


def test_neighbour_graph_edges():
    # Centre 0 has neighbours at (3, 4) µm and (6, 8) µm; centre 1 has one at (30, 0) µm.
    offsets = torch.tensor([[3.0, 4.0], [6.0, 8.0], [30.0, 0.0]])
    nbr_batch = torch.tensor([0, 0, 1])
    edge_index, length = build_neighbour_graph(2, offsets, nbr_batch, radius_um=6.0)
    edges = {(s, t): d for (s, t), d in zip(edge_index.T.tolist(), length.tolist())}
    expected = {
        (0, 2): 5.0,
        (2, 0): 5.0,
        (0, 3): 10.0,
        (3, 0): 10.0,
        (1, 4): 30.0,
        (4, 1): 30.0,  # spokes
        (2, 3): 5.0,
        (3, 2): 5.0,  # neighbours 5 µm apart, within 6 µm
        **{(i, i): 0.0 for i in range(5)},
    }
    assert edges.keys() == expected.keys()
    for edge, d in expected.items():
        assert edges[edge] == pytest.approx(d)
    star_only, _ = build_neighbour_graph(2, offsets, nbr_batch, radius_um=None)
    assert star_only.shape[1] == len(expected) - 2


def test_bag_node_encoder_is_cheaper():
    flops_t = estimate_flops_per_sample(tiny_cfg(node_encoder="transformer"))
    flops_b = estimate_flops_per_sample(tiny_cfg(node_encoder="bag"))
    assert flops_b["node_encoder_bag"] < flops_t["node_encoder_transformer"] / 10
    assert flops_b["forward"] < flops_t["forward"]
    assert flops_t["train"] == 3 * flops_t["forward"]
    # Paper scale: neighbours through the full transformer cost k times the cell encoder.
    paper = estimate_flops_per_sample(None, n_neighbours=8)
    assert paper["node_encoder_transformer"] == pytest.approx(8 * paper["cell_encoder"], rel=0.01)


def test_local_weights_load(tmp_path):
    torch.manual_seed(1)
    source = create_backbone("vit_tiny_patch16_224", IMAGE_KWARGS).eval()
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    cfg = tiny_cfg()
    cfg["image"]["weights"] = str(path)
    model = build_model(cfg).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.image_encoder.features(images), source(images), rtol=0, atol=0)

    # A torch checkpoint wrapping the state_dict, with a classifier head as in timm's hub files.
    wrapped = dict(source.state_dict(), **{"head.weight": torch.zeros(10, 64), "head.bias": torch.zeros(10)})
    pth = tmp_path / "backbone.pth"
    torch.save({"state_dict": wrapped}, pth)
    cfg["image"]["weights"] = str(pth)
    with torch.no_grad():
        torch.testing.assert_close(build_model(cfg).image_encoder.features(images), source(images), rtol=0, atol=0)


def test_mismatched_weights_raise(tmp_path):
    deeper = create_backbone("vit_tiny_patch16_224", dict(IMAGE_KWARGS, depth=3))
    path = tmp_path / "deeper.safetensors"
    save_file({k: v.contiguous() for k, v in deeper.state_dict().items()}, str(path))
    cfg = tiny_cfg()
    cfg["image"]["weights"] = str(path)
    with pytest.raises(InputError, match="deeper.safetensors") as err:
        build_model(cfg)
    assert "unexpected keys" in str(err.value) and "blocks.2." in str(err.value)

    cfg["image"]["weights"] = str(tmp_path / "absent.safetensors")
    with pytest.raises(InputError, match="absent.safetensors"):
        build_model(cfg)


def test_unknown_config_key_raises():
    cfg = tiny_cfg()
    cfg["cell"]["layer"] = 3
    with pytest.raises(InputError, match=r"model\.cell\.layer"):
        build_model(cfg)


@pytest.mark.parametrize("node_encoder", ["tokens", "transformer", "bag"])
def test_gradients_reach_every_parameter(node_encoder):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(node_encoder=node_encoder)).train()
    out = model(make_batch())
    (out["img_emb"] * out["cell_emb"]).sum().backward()
    groups = model.parameter_groups()
    assert set(groups) == {"image", "cell", "graph", "fusion"}
    for name, params in groups.items():
        assert all(p.grad is not None for p in params), name
        assert sum(p.grad.abs().sum() for p in params) > 0, name
    assert sum(len(p) for p in groups.values()) == len(list(model.parameters()))


def test_grad_checkpointing_gives_same_gradients():
    batch = make_batch()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = tiny_cfg()
        cfg["grad_checkpointing"] = checkpointing
        model = build_model(cfg).train()
        out = model(batch)
        (out["img_emb"] * out["cell_emb"]).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain)


@pytest.mark.parametrize("node_encoder", ["tokens", "transformer", "bag"])
def test_flop_estimate_matches_flop_counter(node_encoder):
    k, n_cells = 3, 2
    cfg = tiny_cfg(node_encoder=node_encoder, radius_um=1e6)  # every neighbour pair is an edge
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = make_batch(n_cells=2, nbr_counts=(k, k))
    batch["tokens"] = make_tokens(n_cells)  # no padding: the estimate assumes full rows
    batch["nbr_tokens"] = make_tokens(n_cells * k, seed=3)
    # The math SDPA backend runs as matmuls the counter sees (the CPU fused kernel is not counted).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(batch)
    counted = counter.get_total_flops() / n_cells
    estimate = estimate_flops_per_sample(cfg, n_neighbours=k)["forward"]
    assert estimate == pytest.approx(counted, rel=0.15)


@pytest.mark.parametrize("node_encoder", ["tokens", "transformer", "bag"])
def test_host_prepared_batch_gives_the_same_outputs_and_the_device_forward_reads_nothing_back(node_encoder):
    """prepare_host_batch trims padding and builds the graph on the CPU; the forward then runs on the
    meta device, where any read of a value (.tolist(), int(), nonzero) raises: no host sync."""
    cfg = tiny_cfg(node_encoder=node_encoder)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = make_batch()
    batch["tokens"] = make_tokens(3, [9, 7, 11])  # every row padded past column 11
    host = prepare_host_batch(batch, resolve_model_config(cfg))
    assert host["tokens"].shape == (3, 11) and host["nbr_tokens"].shape[1] == 11
    edge_index, _ = build_neighbour_graph(3, batch["nbr_offsets_um"], batch["nbr_batch"], radius_um=25.0)
    torch.testing.assert_close(host["nbr_edge_index"], edge_index)
    with torch.no_grad():
        plain, prepared = model(batch), model(host)
    for key in ("img_emb", "cell_emb", "graph_feat"):
        torch.testing.assert_close(prepared[key], plain[key], rtol=1e-5, atol=1e-6)

    meta_model = model.to("meta")
    with torch.no_grad():
        out = meta_model({k: v.to("meta") for k, v in host.items()})
    assert out["cell_emb"].shape == (3, 8)
    with torch.no_grad(), pytest.raises(RuntimeError, match="meta|Meta"):  # control: the device graph reads sizes
        meta_model({k: v.to("meta") for k, v in batch.items()})


def test_tokens_node_encoder_is_the_papers_mean_token_embedding():
    """Paper: h0 = Embed(G): the node feature is a projection of the mean of the cell transformer's own
    token embeddings over the real tokens, far cheaper than running the transformer on every neighbour."""
    cfg = tiny_cfg(node_encoder="tokens")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tokens = make_tokens(2, [5, 9])
    with torch.no_grad():
        nodes = model.graph.node_features(
            tokens[:1], tokens[1:], token_embedding=model.cell_encoder.token_embedding.weight
        )
        emb = model.cell_encoder.token_embedding.weight
        expected = torch.stack([emb[tokens[0, :5]].mean(0), emb[tokens[1, :9]].mean(0)])
    torch.testing.assert_close(nodes, model.graph.node_proj(expected))
    assert resolve_model_config(None)["graph"]["node_encoder"] == "tokens"  # the default
    paper = estimate_flops_per_sample(None, n_neighbours=8)
    assert paper["node_encoder"] == paper["node_encoder_tokens"] < paper["cell_encoder"] / 100


def test_uni_preset_loads_a_layerscale_vit_checkpoint(tmp_path):
    """model.image.preset: uni builds timm's ViT with LayerScale (init_values) and UNI's kwargs; a small
    stand-in checkpoint with LayerScale loads strictly, and without the preset it is refused."""
    small = {"img_size": 32, "patch_size": 16, "depth": 2, "embed_dim": 64, "num_heads": 2}
    torch.manual_seed(3)
    source = create_backbone("vit_large_patch16_224", {**IMAGE_PRESETS["uni"]["kwargs"], **small}).eval()
    assert any(k.endswith("ls1.gamma") for k in source.state_dict())  # LayerScale, as in UNI
    with torch.no_grad():
        source.blocks[0].ls1.gamma.fill_(0.5)  # trained values, not the 1e-5 initialisation
    path = tmp_path / "pytorch_model.bin"
    torch.save(source.state_dict(), path)
    cfg = tiny_cfg()
    cfg["image"] = {"preset": "uni", "kwargs": small, "weights": str(path)}
    resolved = resolve_model_config(cfg)
    assert resolved["image"]["arch"] == "vit_large_patch16_224"
    assert resolved["image"]["kwargs"]["init_values"] == 1e-5 and resolved["image"]["kwargs"]["depth"] == 2
    assert resolve_model_config(resolved) == resolved  # idempotent (the saved config resolves to itself)
    model = build_model(cfg).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.image_encoder.features(images), source(images), rtol=0, atol=0)
    plain = tiny_cfg()
    plain["image"] = {"arch": "vit_large_patch16_224", "kwargs": small, "weights": str(path)}
    with pytest.raises(InputError, match="ls1.gamma"):
        build_model(plain)
    with pytest.raises(InputError, match="preset"):
        resolve_model_config({"image": {"preset": "conch"}})


def test_compile_wraps_the_towers_and_keeps_the_state_dict_keys():
    cfg = tiny_cfg()
    cfg["compile"] = True
    model = build_model(cfg)  # build_model never compiles (export and inference build models too)
    assert model.cell_encoder._compiled_call_impl is None
    keys = list(model.state_dict())
    compile_towers(model)
    assert model.cell_encoder._compiled_call_impl is not None
    assert model.image_encoder.backbone._compiled_call_impl is not None
    assert model.graph._compiled_call_impl is None
    assert list(model.state_dict()) == keys
