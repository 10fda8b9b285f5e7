"""revision/conv_tower.py: a small CNN as a standard transformers model, and the world's dual encoder built on it."""
import numpy as np
import pytest
import torch
from transformers import AutoModel, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

from revision.conv_tower import ConvTowerConfig, ConvTowerModel

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_trained_tower_loads_back_with_its_batch_norm_statistics(tmp_path):
    """transformers calls _init_weights after loading: a reset there once wiped the loaded running statistics."""
    torch.manual_seed(0)
    tower = ConvTowerModel(ConvTowerConfig(widths=[4, 8], hidden_size=16, image_size=16))
    with torch.no_grad():
        for _ in range(3):  # training-mode forwards move the running statistics away from 0 / 1
            tower.train()(pixel_values=3 + 2 * torch.randn(8, 3, 16, 16))
    tower.eval().save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()  # by its registered model_type
    assert type(loaded) is ConvTowerModel
    for key, value in tower.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert tower.features[1].running_mean.abs().max() > 0.1  # the statistics did move
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(pixel_values=x).pooler_output, tower(pixel_values=x).pooler_output)


def test_convolutions_per_stage_and_the_activation_are_config_and_load_back(tmp_path):
    torch.manual_seed(0)
    tower = ConvTowerModel(ConvTowerConfig(widths=[4, 8], convs=[1, 2], activation="relu", hidden_size=16, image_size=16))
    convs = [m for m in tower.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 4), (4, 8), (8, 8)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in tower.features) == 3 and not any(
        isinstance(m, torch.nn.GELU) for m in tower.features)
    tower.eval().save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert (loaded.config.convs, loaded.config.activation) == ([1, 2], "relu")
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(pixel_values=x).pooler_output, tower(pixel_values=x).pooler_output)
    assert ConvTowerConfig(widths=[4, 8]).convs == [2, 2]  # a config saved before the field: two a stage, as then
    with pytest.raises(ValueError, match=r"convs \[2\] must give each of the 2 widths at least one convolution"):
        ConvTowerConfig(widths=[4, 8], convs=[2])
    with pytest.raises(ValueError, match="convs"):
        ConvTowerConfig(widths=[4, 8], convs=[0, 2])
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        ConvTowerConfig(activation="swishy")


def test_an_mlp_pool_loads_back_and_is_not_a_sum_over_places(tmp_path):
    """A linear pool makes the pooled output a sum of what each place of the map holds (two things at two places
    pool to the sum of each alone); the MLP pool (pool_hidden) does not, so it can code objects by reading order."""
    torch.manual_seed(0)
    linear = ConvTowerModel(ConvTowerConfig(widths=[4, 8], hidden_size=16, image_size=16)).eval()
    mlp = ConvTowerModel(ConvTowerConfig(widths=[4, 8], hidden_size=16, image_size=16, pool_hidden=32)).eval()
    assert isinstance(linear.pool, torch.nn.Linear) and [type(m) for m in mlp.pool] == [torch.nn.Linear, torch.nn.GELU, torch.nn.Linear]
    empty, one, other = torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 4, 4)
    one[0, :, 0, 0], other[0, :, 3, 3] = 2.0, -1.5

    def excess(tower: ConvTowerModel) -> float:
        with torch.no_grad():
            pooled = {k: tower.pool(m.flatten(1)) for k, m in (("empty", empty), ("one", one), ("other", other), ("both", one + other))}
        return float((pooled["both"] - pooled["one"] - pooled["other"] + pooled["empty"]).abs().max())

    assert excess(linear) < 1e-5
    assert excess(mlp) > 1e-2
    mlp.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert loaded.config.pool_hidden == 32
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(pixel_values=x).pooler_output, mlp(pixel_values=x).pooler_output)
    assert ConvTowerConfig().pool_hidden == 0  # a config saved before the field: the linear pool, as then
    with pytest.raises(ValueError, match="pool_hidden -1"):
        ConvTowerConfig(pool_hidden=-1)


def test_a_query_pool_reads_places_by_their_position_and_loads_back(tmp_path):
    """pool_queries: learned queries attend over the map's places (object-centric pooling, as CLIP's ResNet attention
    pool or DETR's object queries): each query reads a weighted mix of places, so it can take one object whole. Which
    place holds a thing is known only through the place embedding: without it the pool is blind to where things are."""
    torch.manual_seed(0)
    tower = ConvTowerModel(ConvTowerConfig(widths=[4, 8], hidden_size=16, image_size=16, pool_queries=2, pool_heads=2)).eval()
    assert tower.queries.shape == (2, 8) and tower.place.shape == (16, 8) and tower.pool.in_features == 16
    with torch.no_grad():  # as after training: queries and places far from their small initial values
        tower.queries.normal_()
        tower.place.normal_()
    grid = torch.zeros(1, 8, 4, 4)
    grid[0, :, 0, 0] = 1.0
    moved = grid.roll(shifts=(2, 3), dims=(2, 3))  # the same thing at another place
    tower.features = torch.nn.Identity()  # feed the map directly

    def pooled(map_: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return tower(pixel_values=map_).pooler_output

    assert (pooled(grid) - pooled(moved)).abs().max() > 1e-3
    with torch.no_grad():
        tower.place.zero_()
    assert torch.allclose(pooled(grid), pooled(moved), atol=1e-6)  # no place embedding: where is lost

    torch.manual_seed(1)
    tower = ConvTowerModel(ConvTowerConfig(widths=[4, 8], hidden_size=16, image_size=16, pool_queries=3)).eval()
    tower.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert (loaded.config.pool_queries, loaded.config.pool_heads) == (3, 4)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(pixel_values=x).pooler_output, tower(pixel_values=x).pooler_output)
    assert ConvTowerConfig().pool_queries == 0  # a config saved before the field: the flattened map, as then
    with pytest.raises(ValueError, match="pool_queries -1"):
        ConvTowerConfig(pool_queries=-1)
    with pytest.raises(ValueError, match="divisible by pool_heads 3"):
        ConvTowerConfig(widths=[4, 8], pool_queries=2, pool_heads=3)


def test_position_survives_the_pooling():
    """The same blob in two corners gives two different pooled vectors (a global average pool would not)."""
    torch.manual_seed(0)
    tower = ConvTowerModel(ConvTowerConfig(widths=[4, 8], hidden_size=16, image_size=16)).eval()
    left, right = torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16)
    left[..., 2:6, 2:6], right[..., 10:14, 10:14] = 1.0, 1.0
    with torch.no_grad():
        a, b = tower(pixel_values=left).pooler_output, tower(pixel_values=right).pooler_output
    assert (a - b).abs().max() > 1e-3


def test_a_dual_encoder_holding_the_tower_saves_and_loads_without_remote_code(tmp_path):
    from transformers import BertConfig

    text = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        ConvTowerConfig(widths=[4, 8], hidden_size=16, image_size=16), text, projection_dim=8)
    model = VisionTextDualEncoderModel(config).eval()
    model.save_pretrained(tmp_path)
    loaded = VisionTextDualEncoderModel.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(loaded.get_image_features(pixel_values=x).pooler_output,
                          model.get_image_features(pixel_values=x).pooler_output)
    with pytest.raises(ValueError, match="divisible"):
        ConvTowerConfig(widths=[4, 8, 16], image_size=20)


def test_redrawn_captions_and_their_labels(mini_world):
    """Redraw turns each paired caption back into its scene and draws it anew; the heads' labels are the caption's."""
    from demo.clip import image_processor
    from demo.dual_encoder import AttributeHeads, Redraw
    from demo.scenes import COLOURS, POSITIONS, SHAPES
    from revision.records import read_records

    pairs = read_records(mini_world / "paired.jsonl")
    scenes = {r["id"]: r["attributes"] for r in read_records(mini_world / "scenes.jsonl")}
    draw = Redraw([p["caption"] for p in pairs], image_processor(), seed=0)
    index = torch.arange(4)
    first, second = draw[index], draw[index]
    assert first.shape == (4, 3, 64, 64) and not torch.equal(first, second)  # another picture of the same captions
    heads = AttributeHeads(16, draw)
    for i, pair in enumerate(pairs):
        truth = scenes[pair["id"]]
        assert heads.count[i] == truth["count"] - 1
        # slots: the objects in reading order (colour, shape, size, position each); a missing second object: -100
        objects = sorted(truth["objects"], key=lambda o: POSITIONS.index(o["position"]))
        for slot, obj in enumerate(objects):
            colour, shape, _, position = heads.slots[i, slot].tolist()
            assert (colour, shape, position) == (list(COLOURS).index(obj["colour"]), SHAPES.index(obj["shape"]),
                                                 POSITIONS.index(obj["position"]))
        assert (heads.slots[i, len(objects):] == -100).all()
    assert {len(scenes[p["id"]]["objects"]) for p in pairs} == {1, 2}  # both kinds were checked
    with pytest.raises(ValueError, match="names no complete object"):
        Redraw(["a picture of nothing at all."], image_processor(), seed=0)
    assert np.isfinite(heads.loss(torch.randn(4, 16), index).item())
    # linear_slots: the slot heads read the features as they are (the default reads them through a GELU)
    linear = AttributeHeads(16, draw, linear_slots=True)
    linear.load_state_dict(heads.state_dict())
    features = torch.randn(4, 16)
    assert torch.allclose(linear.loss(torch.nn.functional.gelu(features), index), heads.loss(features, index))
    assert not torch.allclose(linear.loss(features, index), heads.loss(features, index))


def test_cell_heads_read_what_is_in_each_grid_cell(mini_world):
    """Per-cell labels: each object's shape, colour and size at its cell in reading order, `empty` elsewhere; the heads
    learn them off a grid that holds the labels (loss near 0), not off one of noise (the shape, colour and size
    losses of the cell heads alone: the slot heads' loss on the same features is subtracted)."""
    from demo.clip import image_processor
    from demo.dual_encoder import AttributeHeads, Redraw, cell_labels
    from demo.scenes import COLOURS, POSITIONS, SHAPES, SIZES, Obj

    cells = cell_labels([Obj("star", "red", "large", "bottom right"), Obj("circle", "white", "small", "top left")])
    assert cells[0] == [SHAPES.index("circle"), list(COLOURS).index("white"), list(SIZES).index("small")]
    assert cells[8] == [SHAPES.index("star"), list(COLOURS).index("red"), list(SIZES).index("large")]
    assert all(c == [len(SHAPES), -100, -100] for c in cells[1:8]) and len(cells) == len(POSITIONS)

    from demo.clip import read_pairs
    draw = Redraw([p["caption"] for p in read_pairs(mini_world)], image_processor(), seed=0)
    torch.manual_seed(0)
    index = torch.arange(len(draw))
    truth = AttributeHeads(4, draw, cell_weight=1.0, grid_channels=24).cells[index]  # [N, 9, 3]
    # a 3x3 grid whose channels one-hot the true labels (empty: -100 -> no channel), and one of noise
    informative = torch.zeros(len(draw), 24, 3, 3)
    for k, offset in enumerate((0, len(SHAPES) + 1, len(SHAPES) + 1 + len(COLOURS))):
        valid = truth[..., k] >= 0
        n, cell = valid.nonzero(as_tuple=True)
        informative[n, offset + truth[n, cell, k], cell // 3, cell % 3] = 5.0
    losses = {}
    for name, grid in (("informative", informative), ("noise", torch.randn_like(informative))):
        heads = AttributeHeads(4, draw, cell_weight=1.0, grid_channels=24)
        optimizer = torch.optim.Adam(heads.cell.parameters(), lr=0.1)
        for _ in range(100):
            loss = heads.loss(torch.zeros(len(draw), 4), index, grid) - heads.loss(torch.zeros(len(draw), 4), index)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses[name] = loss.item()
    assert losses["informative"] < 0.01 and losses["noise"] > 0.3  # (measured: 0.0002 and 0.51)


def test_pictures_drawn_in_the_worker_are_the_ones_drawn_in_line(mini_world):
    """The drawing worker draws the same pictures in the same order as drawing in line (its own copy of the stream)."""
    from demo.clip import image_processor, read_pairs
    from demo.dual_encoder import Redraw, drawing_pool, prefetched

    captions = [p["caption"] for p in read_pairs(mini_world)]
    batches = [torch.tensor([0, 1, 2]), torch.tensor([3, 0]), torch.tensor([1, 1])]
    in_line = [pictures for _, pictures in prefetched(iter(batches), Redraw(captions, image_processor(), seed=3))]
    draw = Redraw(captions, image_processor(), seed=3)
    pool = drawing_pool(draw)
    assert pool is not None  # Linux: fork
    try:
        pooled = list(prefetched(iter(batches), draw, pool))
    finally:
        pool.shutdown()
    assert [index.tolist() for index, _ in pooled] == [b.tolist() for b in batches]
    assert all(torch.equal(a, b) for a, b in zip(in_line, (p for _, p in pooled), strict=True))
    assert len(in_line) == 3 and not torch.equal(in_line[0][:2], in_line[1][:2])


def test_label_pretraining_without_redrawn_pictures_is_refused(mini_world, tmp_path):
    from demo.dual_encoder import DualEncoderConfig, train_dual_encoder

    with pytest.raises(ValueError, match="--redraw true"):
        train_dual_encoder(mini_world, tmp_path, DualEncoderConfig(redraw=False, pretrain_steps=2, steps=1))


def test_text_features_come_back_in_the_captions_order():
    """Batched by length (less padding): each caption's feature is the one it gets alone, in its own row."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, PreTrainedTokenizerFast

    from demo.dual_encoder import text_tower_features

    words = "a red blue circle square small large at the top left and".split()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    text = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    model = VisionTextDualEncoderModel(VisionTextDualEncoderConfig.from_vision_text_configs(
        ConvTowerConfig(widths=[4], hidden_size=8, image_size=8), text, projection_dim=8)).eval()
    captions = ["a red circle and a blue square at the top left", "a small circle", "a large blue square at the top",
                "a red circle", "a blue square and a small red circle"]
    batched = text_tower_features(model, tokenizer, captions, batch=2)
    alone = torch.cat([text_tower_features(model, tokenizer, [c]) for c in captions])
    assert batched.shape == (5, 16) and torch.allclose(batched, alone, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)
