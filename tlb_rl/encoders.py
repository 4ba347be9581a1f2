"""Observation encoders, chosen from the observation space: ``make_encoder(space) -> Encoder``.

An encoder maps a batch of observations (tensors with leading dim N; a dict of them for ``Dict`` spaces)
to features [N, output_dim]. Which encoder a space gets:

=====================================================  ==============================================
space                                                  encoder
=====================================================  ==============================================
integer ``Box`` H x W x C with small values (<= 31)    symbolic grid (MiniGrid): each channel's value
                                                       embedded, summed per cell (BabyAI 1.1's
                                                       bag of words), then a small CNN
other ``Box`` with 3 dims                              pixel image: a CNN (channels first or last)
other ``Box``, ``MultiBinary``                         flat vector: an MLP, inputs scaled to [-1, 1]
                                                       where the bounds are finite
``Discrete`` / ``MultiDiscrete``                       an embedding per component
integer 1-dim ``Box`` under a text key (``mission``)   token ids: embedding + GRU, or bag of words
``Dict`` of the above                                  each entry encoded, features concatenated;
                                                       with ``film=True`` the text also conditions the
                                                       image's feature maps (FiLM, as in BabyAI)
=====================================================  ==============================================
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from tlb_rl.errors import UserError

SUPPORTED_SPACES = "Box, Discrete, MultiDiscrete, MultiBinary, or a Dict of these (Text once tokenised)"
_MAX_SYMBOL = 31  # integer images whose values stay at or below this are symbolic grids, not pixels
_PIXEL_CHANNELS = (1, 3, 4)

Observation = torch.Tensor | dict[str, torch.Tensor]


@dataclass(frozen=True)
class EncoderConfig:
    """Hyperparameters of the encoders; ``make_encoder(space, **fields)``."""

    hidden_dim: int = 128
    """Output width of every image, vector and text encoder, and width of MLP layers."""
    embedding_dim: int = 32
    """Width of the embeddings of grid-cell values, tokens and discrete observations."""
    text: str = "gru"
    """How token ids are read: "gru" (embedding + GRU, BabyAI) or "bow" (mean of word embeddings)."""
    film: bool = False
    """Condition the image's feature maps on the text (FiLM); needs one image and one text entry."""
    text_keys: tuple[str, ...] = ("mission",)
    """Dict keys whose 1-dim integer Box holds token ids (``envs`` puts text under "mission")."""
    norm: bool = False
    """Layer-normalise the features handed to the core (no learned scale), so their scale stays put whatever
    the encoder learns. Unnormalised FiLM features grew until an LSTM core's gates saturated in one BC run of
    three (docs/results.md); TLB's pre-LayerNorm blocks do not see the scale."""


class Encoder(nn.Module):
    """Base of the encoders: ``forward(obs)`` returns features [N, output_dim]."""

    output_dim: int


def _mlp(input_dim: int, hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU())


def _small_convs(in_channels: int) -> nn.Sequential:
    # Two 3x3 convs that keep the size: a 3x3 or 7x7 view has no room for striding.
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU()
    )


class ImageEncoder(Encoder):
    """Base of the image encoders: a conv trunk to feature maps [N, C, H, W], then a linear head.

    Split in two so a :class:`DictEncoder` can apply FiLM between them.
    """

    trunk: nn.Module

    def _build_head(self, example: torch.Tensor, hidden_dim: int) -> None:
        with torch.no_grad():
            maps = self.trunk(example)
        self.channels = maps.shape[1]
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(maps[0].numel(), hidden_dim), nn.ReLU())
        self.output_dim = hidden_dim

    def feature_maps(self, obs: torch.Tensor) -> torch.Tensor:
        """Conv features [N, C, H, W] of a batch of images."""
        raise NotImplementedError

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_maps(obs))


class GridEncoder(ImageEncoder):
    """Symbolic grid H x W x C of small integers (MiniGrid's object, colour, state).

    Every channel's value has its own embedding row; a cell is the sum of its channels' embeddings
    (BabyAI 1.1's bag of words), then two 3x3 convs keep the grid's size.

    :param space: the grid's Box; ``high`` sizes the embedding table.
    :param config: encoder hyperparameters.
    """

    def __init__(self, space: spaces.Box, config: EncoderConfig):
        super().__init__()
        sizes = space.high.reshape(-1, space.shape[-1]).max(0).astype(np.int64) + 1  # per channel
        self.register_buffer("offsets", torch.as_tensor(np.concatenate([[0], np.cumsum(sizes)[:-1]])))
        self.embedding = nn.Embedding(int(sizes.sum()), config.embedding_dim)
        self.trunk = _small_convs(config.embedding_dim)
        height, width, _ = space.shape
        self._build_head(torch.zeros(1, config.embedding_dim, height, width), config.hidden_dim)

    def feature_maps(self, obs: torch.Tensor) -> torch.Tensor:
        cells = self.embedding(obs.long() + self.offsets).sum(dim=3)  # [N, H, W, E]
        return self.trunk(cells.permute(0, 3, 1, 2))  # [N, C, H, W]


def _scaling(space: spaces.Box) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, scale)`` mapping finite bounds to [-1, 1] by ``(x - low) * scale - 1``; identity elsewhere."""
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    bounded = np.isfinite(low) & np.isfinite(high) & (high > low)
    scale = np.where(bounded, 2.0 / np.where(bounded, high - low, 1.0), 1.0)
    low = np.where(bounded, low, -1.0)  # unbounded: (x + 1) * 1 - 1 = x
    return torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(scale, dtype=torch.float32)


class PixelEncoder(ImageEncoder):
    """Pixel image (channels first or last): Nature-DQN convs from 36 px up, two 3x3 convs below.

    :param space: the image's Box; finite bounds scale pixels to [-1, 1].
    :param config: encoder hyperparameters.
    """

    def __init__(self, space: spaces.Box, config: EncoderConfig):
        super().__init__()
        shape = space.shape
        self.channels_last = shape[-1] in _PIXEL_CHANNELS or shape[0] not in _PIXEL_CHANNELS
        channels, height, width = (shape[2], shape[0], shape[1]) if self.channels_last else shape
        low, scale = _scaling(space)
        self.register_buffer("low", low)
        self.register_buffer("scale", scale)
        if min(height, width) >= 36:
            self.trunk = nn.Sequential(
                nn.Conv2d(channels, 32, 8, stride=4), nn.ReLU(),
                nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
                nn.Conv2d(64, 64, 3), nn.ReLU(),
            )  # fmt: skip
        else:
            self.trunk = _small_convs(channels)
        self._build_head(torch.zeros(1, channels, height, width), config.hidden_dim)

    def feature_maps(self, obs: torch.Tensor) -> torch.Tensor:
        x = (obs.float() - self.low) * self.scale - 1.0
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)  # [N, C, H, W]
        return self.trunk(x)


class VectorEncoder(Encoder):
    """Flat vector (any Box that is not an image, or MultiBinary): an MLP of two layers.

    :param space: the Box or MultiBinary; finite bounds scale inputs to [-1, 1].
    :param config: encoder hyperparameters.
    """

    def __init__(self, space: spaces.Box | spaces.MultiBinary, config: EncoderConfig):
        super().__init__()
        box = space if isinstance(space, spaces.Box) else spaces.Box(0, 1, space.shape, np.int8)
        low, scale = _scaling(box)
        self.register_buffer("low", low.flatten())
        self.register_buffer("scale", scale.flatten())
        self.mlp = _mlp(int(np.prod(space.shape)), config.hidden_dim)
        self.output_dim = config.hidden_dim

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.reshape(obs.shape[0], -1).float()  # [N, D]
        return self.mlp((x - self.low) * self.scale - 1.0)


class DiscreteEncoder(Encoder):
    """Discrete or MultiDiscrete: one embedding per component, concatenated.

    :param space: the Discrete or MultiDiscrete (``start`` offsets are honoured).
    :param config: encoder hyperparameters.
    """

    def __init__(self, space: spaces.Discrete | spaces.MultiDiscrete, config: EncoderConfig):
        super().__init__()
        nvec = np.reshape(space.n if isinstance(space, spaces.Discrete) else space.nvec, -1)
        start = np.reshape(space.start, -1)
        self.register_buffer("offsets", torch.as_tensor(np.concatenate([[0], np.cumsum(nvec)[:-1]]) - start))
        self.embedding = nn.Embedding(int(nvec.sum()), config.embedding_dim)
        self.output_dim = config.embedding_dim * nvec.size

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        ids = obs.reshape(obs.shape[0], -1).long() + self.offsets  # [N, K]
        return self.embedding(ids).flatten(1)  # [N, K * E]


class TextEncoder(Encoder):
    """Token ids [N, L] (pad 0): an embedding, then a GRU's last state or the mean of the words.

    :param space: the token Box; ``high`` + 1 is the vocabulary size.
    :param config: encoder hyperparameters (``text``: "gru" or "bow").
    """

    def __init__(self, space: spaces.Box, config: EncoderConfig):
        super().__init__()
        self.embedding = nn.Embedding(int(np.max(space.high)) + 1, config.embedding_dim, padding_idx=0)
        self.mode = config.text
        if self.mode == "gru":
            self.rnn = nn.GRU(config.embedding_dim, config.hidden_dim, batch_first=True)
        else:
            self.proj = nn.Sequential(nn.Linear(config.embedding_dim, config.hidden_dim), nn.ReLU())
        self.output_dim = config.hidden_dim

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        ids = obs.long()
        lengths = (ids != 0).sum(dim=1)  # [N]
        ids = ids[:, : max(int(lengths.max()), 1)]  # drop the padding every mission has
        words = self.embedding(ids)  # [N, L, E]
        if self.mode == "bow":
            return self.proj(words.sum(1) / lengths.clamp(min=1)[:, None])
        packed = pack_padded_sequence(words, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        _, last = self.rnn(packed)  # [1, N, H]
        return last[0]


class FiLMBlock(nn.Module):
    """Residual FiLM block (BabyAI 1.1): ``x + relu(conv(x) * (1 + gamma(c)) + beta(c))``.

    :param channels: channels of the feature maps.
    :param condition_dim: width of the conditioning vector.
    """

    def __init__(self, channels: int, condition_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.gamma_beta = nn.Linear(condition_dim, 2 * channels)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.gamma_beta(condition)[:, :, None, None].chunk(2, dim=1)  # [N, C, 1, 1] each
        return x + torch.relu(self.conv(x) * (1 + gamma) + beta)


class DictEncoder(Encoder):
    """Dict observations: every entry encoded by its own encoder, features concatenated in key order.

    :param space: the Dict.
    :param config: encoder hyperparameters; with ``film`` the text entry conditions the image entry.
    """

    def __init__(self, space: spaces.Dict, config: EncoderConfig):
        super().__init__()
        for key, part in space.items():
            if isinstance(part, spaces.Dict):
                raise UserError(f"observation entry '{key}': nested Dict spaces are not supported: {part}")
        self.parts = nn.ModuleDict(
            {key: _encoder_for(part, config, text=key in config.text_keys) for key, part in space.items()}
        )
        self.film_image = self.film_text = None
        if config.film:
            images = [k for k, e in self.parts.items() if isinstance(e, ImageEncoder)]
            texts = [k for k, e in self.parts.items() if isinstance(e, TextEncoder)]
            if len(images) != 1 or len(texts) != 1:
                raise UserError(
                    f"film=True needs exactly one image and one text entry; this Dict has images {images} "
                    f"and texts {texts} (text keys: {list(config.text_keys)})"
                )
            self.film_image, self.film_text = images[0], texts[0]
            channels = self.parts[self.film_image].channels
            self.film = nn.ModuleList([FiLMBlock(channels, self.parts[self.film_text].output_dim) for _ in range(2)])
        self.output_dim = sum(e.output_dim for e in self.parts.values())

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        features = {}
        if self.film_image is not None:
            text = features[self.film_text] = self.parts[self.film_text](obs[self.film_text])
            image = self.parts[self.film_image]
            maps = image.feature_maps(obs[self.film_image])
            for block in self.film:
                maps = block(maps, text)
            features[self.film_image] = image.head(maps)
        for key, encoder in self.parts.items():
            if key not in features:
                features[key] = encoder(obs[key])
        return torch.cat([features[key] for key in self.parts], dim=-1)  # [N, output_dim]


def _is_token_box(space: spaces.Space) -> bool:
    return isinstance(space, spaces.Box) and len(space.shape) == 1 and np.issubdtype(space.dtype, np.integer)


def _is_grid(space: spaces.Box) -> bool:
    return (
        len(space.shape) == 3
        and np.issubdtype(space.dtype, np.integer)
        and np.all(space.low >= 0)
        and np.all(space.high <= _MAX_SYMBOL)
    )


def _encoder_for(space: spaces.Space, config: EncoderConfig, text: bool = False) -> Encoder:
    if isinstance(space, spaces.Dict):
        return DictEncoder(space, config)
    if text and _is_token_box(space):
        return TextEncoder(space, config)
    if isinstance(space, spaces.Box):
        if _is_grid(space):
            return GridEncoder(space, config)
        if len(space.shape) == 3:
            return PixelEncoder(space, config)
        return VectorEncoder(space, config)
    if isinstance(space, spaces.MultiBinary):
        return VectorEncoder(space, config)
    if isinstance(space, (spaces.Discrete, spaces.MultiDiscrete)):
        return DiscreteEncoder(space, config)
    hint = " (make_env tokenises Text observations)" if isinstance(space, spaces.Text) else ""
    raise UserError(f"observation space {space} is not supported; supported: {SUPPORTED_SPACES}{hint}")


def _encoder_config(**kwargs: object) -> EncoderConfig:
    known = [f.name for f in fields(EncoderConfig)]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise UserError(f"encoder has no option {', '.join(map(repr, unknown))}; it takes: {', '.join(known)}")
    if "text_keys" in kwargs:
        kwargs["text_keys"] = tuple(kwargs["text_keys"])
    config = EncoderConfig(**kwargs)
    if config.text not in ("gru", "bow"):
        raise UserError(f"encoder option text must be 'gru' or 'bow', got {config.text!r}")
    return config


def encoder_options(**kwargs: object) -> dict[str, object]:
    """Every encoder option with its value: ``kwargs`` over the defaults, as a config stores them.

    :raises UserError: for an unknown or invalid option.
    """
    config = _encoder_config(**kwargs)
    return {f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v for f in fields(config)}


def make_encoder(observation_space: spaces.Space, **kwargs: object) -> Encoder:
    """The encoder for ``observation_space`` (see the module docstring); its width is ``.output_dim``.

    :param observation_space: the space of one observation (a vector env's ``single_observation_space``).
    :param kwargs: fields of :class:`EncoderConfig`.
    :raises UserError: for an unsupported space or an unknown or invalid option.
    """
    config = _encoder_config(**kwargs)
    encoder = _encoder_for(observation_space, config)
    return NormalisedEncoder(encoder) if config.norm else encoder


class NormalisedEncoder(Encoder):
    """An encoder's features, layer-normalised over their width (``EncoderConfig.norm``)."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        self.output_dim = encoder.output_dim

    def forward(self, obs: Observation) -> torch.Tensor:
        return F.layer_norm(self.encoder(obs), (self.output_dim,))


def obs_to_tensor(obs: np.ndarray | dict[str, np.ndarray], device: torch.device | str) -> Observation:
    """A batch of numpy observations (a dict of them for Dict spaces) as tensors on ``device``.

    Integer arrays keep their dtype (uint8 images travel as bytes); float64 becomes float32.
    """
    if isinstance(obs, dict):
        return {key: obs_to_tensor(value, device) for key, value in obs.items()}
    array = np.asarray(obs)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return torch.as_tensor(array, device=device)
