"""A small convolutional vision tower as a standard Hugging Face model, for dual encoders trained from scratch on
small images (the embedded world's CLIP). transformers' own CNNs (ResNet, ConvNeXt, MobileNet) pool globally, which
throws away where things are, and a ViT needs far more steps than a CPU budget allows to learn small shapes.

Registered with AutoConfig/AutoModel under `revision_conv_tower` when this module is imported (revision.encoders
imports it), so `VisionTextDualEncoderModel.from_pretrained(FOLDER)` loads a dual encoder that holds one, like any
checkpoint, without remote code.

Layout: per width w, `convs` 3x3 convolutions (two by default) with batch norm and an activation (GELU by default;
`activation` names any of transformers' ACT2FN), then 2x2 max pooling; the last feature map is flattened (keeping
position) into a linear layer of `hidden_size` features: the pooled output. With `pool_hidden` > 0 that layer is an
MLP (one hidden layer of that width, GELU): a linear pool can only make the pooled output a sum of what each place of
the map holds (a code by place), an MLP can make it any function of the map, such as each object's attributes in
the order the objects are read (a code by object, which a reader binds from far fewer examples; docs/results.md).
With `pool_queries` > 0 the map is first read by that many learned queries, each attending over the map's places
(one multi-head attention, `pool_heads`, each place with a learned position embedding), and the pooled output is made
from what the queries read, concatenated: object-centric pooling as CLIP's ResNet attention pool or DETR's object
queries do it. A query can take one object whole, so the pooled output can hold each object apart (two-object probes
0.98 / 0.93 against 0.83 / 0.74 for the linear pool; docs/results.md "Queries that read one object").
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling


class ConvTowerConfig(PretrainedConfig):
    model_type = "revision_conv_tower"

    def __init__(self, widths: tuple[int, ...] | list[int] = (16, 32, 64, 64), hidden_size: int = 128,
                 image_size: int = 64, num_channels: int = 3, convs: tuple[int, ...] | list[int] | None = None,
                 activation: str = "gelu", pool_hidden: int = 0, pool_queries: int = 0, pool_heads: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.widths, self.hidden_size = list(widths), hidden_size
        self.image_size, self.num_channels = image_size, num_channels
        self.convs = list(convs) if convs is not None else [2] * len(self.widths)
        self.activation, self.pool_hidden = activation, pool_hidden
        self.pool_queries, self.pool_heads = pool_queries, pool_heads
        if pool_queries < 0 or (pool_queries and self.widths[-1] % pool_heads):
            raise ValueError(f"pool_queries {pool_queries} must be 0 (the flattened map) or a count of queries, and the last "
                             f"width {self.widths[-1]} divisible by pool_heads {pool_heads}")
        if pool_hidden < 0:
            raise ValueError(f"pool_hidden {pool_hidden} must be 0 (a linear pool) or a hidden width")
        if len(self.convs) != len(self.widths) or min(self.convs, default=1) < 1:
            raise ValueError(f"convs {self.convs} must give each of the {len(self.widths)} widths at least one convolution")
        if activation not in ACT2FN:
            raise ValueError(f"unknown activation {activation!r}; choose one of transformers' ACT2FN ({', '.join(sorted(ACT2FN))})")
        if image_size % 2 ** len(self.widths):
            raise ValueError(f"image_size {image_size} must be divisible by 2^{len(self.widths)} (one pooling per width)")


class ConvTowerModel(PreTrainedModel):
    config_class = ConvTowerConfig
    main_input_name = "pixel_values"

    def __init__(self, config: ConvTowerConfig):
        super().__init__(config)
        layers, channels = [], config.num_channels
        for width, convs in zip(config.widths, config.convs):
            for _ in range(convs):
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), ACT2FN[config.activation]]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = config.image_size // 2 ** len(config.widths)
        flat = channels * side * side
        self.queries = None
        if config.pool_queries:  # learned queries attend over the map's places (each with a learned position embedding)
            self.place = nn.Parameter(torch.randn(side * side, channels) * 0.02)
            self.queries = nn.Parameter(torch.randn(config.pool_queries, channels) * 0.02)
            self.attend = nn.MultiheadAttention(channels, config.pool_heads, batch_first=True)
            flat = channels * config.pool_queries
        self.pool = (nn.Sequential(nn.Linear(flat, config.pool_hidden), nn.GELU(), nn.Linear(config.pool_hidden, config.hidden_size))
                     if config.pool_hidden else nn.Linear(flat, config.hidden_size))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Construction already gave each layer torch's own initialisation (what the tower was measured with). Nothing
        # is redone here: transformers calls this after loading too, and a batch norm's reset would wipe its loaded
        # running statistics (buffers), turning a trained tower into one that normalises with zeros and ones.
        return

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs) -> BaseModelOutputWithPooling:
        grid = self.features(pixel_values)
        read = grid if self.queries is None else self.read_places(grid)
        return BaseModelOutputWithPooling(last_hidden_state=grid, pooler_output=self.pool(read.flatten(1)))

    def read_places(self, grid: torch.Tensor) -> torch.Tensor:
        """[B, queries, channels]: what each learned query reads off the map's places (with their position embedding)."""
        places = grid.flatten(2).transpose(1, 2) + self.place.to(grid.dtype)  # [B, places, channels]
        queries = self.queries.to(grid.dtype).expand(len(grid), -1, -1)
        return self.attend(queries, places, places, need_weights=False)[0]


AutoConfig.register(ConvTowerConfig.model_type, ConvTowerConfig, exist_ok=True)
AutoModel.register(ConvTowerConfig, ConvTowerModel, exist_ok=True)
