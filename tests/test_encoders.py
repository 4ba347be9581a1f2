"""Encoders chosen from observation spaces, and action heads chosen from action spaces."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gymnasium import spaces
from torch import nn

from envs.text import VOCABULARY, text_space, tokenize
from tlb_rl.distributions import make_action_head
from tlb_rl.encoders import (
    DictEncoder,
    DiscreteEncoder,
    GridEncoder,
    PixelEncoder,
    TextEncoder,
    VectorEncoder,
    make_encoder,
    obs_to_tensor,
)
from tlb_rl.errors import UserError

GRID = spaces.Box(0, 10, (7, 7, 3), np.uint8)
BABYAI = spaces.Dict({"image": GRID, "direction": spaces.Discrete(4), "mission": text_space()})


def sample_batch(space: spaces.Space, n: int, seed: int = 0) -> torch.Tensor | dict[str, torch.Tensor]:
    space.seed(seed)
    samples = [space.sample() for _ in range(n)]
    if isinstance(space, spaces.Dict):
        return obs_to_tensor({k: np.stack([s[k] for s in samples]) for k in space}, "cpu")
    return obs_to_tensor(np.stack(samples), "cpu")


def missions(*texts: str) -> torch.Tensor:
    return torch.as_tensor(np.stack([tokenize(t) for t in texts]))


@pytest.mark.parametrize(
    ("space", "kind"),
    [
        (GRID, GridEncoder),
        (spaces.Box(0, 255, (64, 64, 3), np.uint8), PixelEncoder),
        (spaces.Box(0.0, 1.0, (3, 20, 20), np.float32), PixelEncoder),
        (spaces.Box(-1.0, 1.0, (5,), np.float32), VectorEncoder),
        (spaces.Box(-np.inf, np.inf, (2, 3), np.float64), VectorEncoder),
        (spaces.MultiBinary(6), VectorEncoder),
        (spaces.Discrete(5, start=2), DiscreteEncoder),
        (spaces.MultiDiscrete([3, 4], start=[1, -1]), DiscreteEncoder),
        (BABYAI, DictEncoder),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else type(v).__name__,
)
def test_each_space_gets_its_encoder_and_encodes_a_batch(space: spaces.Space, kind: type) -> None:
    encoder = make_encoder(space, hidden_dim=48)
    assert isinstance(encoder, kind)
    features = encoder(sample_batch(space, 5))
    assert features.shape == (5, encoder.output_dim) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    features.sum().backward()  # every encoder is trainable end to end
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in encoder.parameters())


def test_grid_cells_are_bags_of_channel_embeddings() -> None:
    encoder = make_encoder(GRID)
    assert encoder.embedding.num_embeddings == 3 * 11  # values 0..10 of object, colour and state
    grid = torch.zeros(2, 7, 7, 3, dtype=torch.uint8)
    grid[1, 3, 3, 1] = 4  # only the colour of one cell differs
    features = encoder(grid)
    assert not torch.allclose(features[0], features[1])


def test_vector_inputs_are_scaled_to_minus_one_one_where_bounded() -> None:
    space = spaces.Box(np.array([0, -np.inf], np.float32), np.array([10, np.inf], np.float32))
    encoder = make_encoder(space)
    encoder.mlp = nn.Identity()
    x = torch.tensor([[0.0, 7.0], [10.0, -3.0], [5.0, 0.0]])
    assert torch.allclose(encoder(x), torch.tensor([[-1.0, 7.0], [1.0, -3.0], [0.0, 0.0]]))


def test_discrete_observations_honour_start() -> None:
    encoder = make_encoder(spaces.Discrete(3, start=5))
    low, high = encoder(torch.tensor([5, 7]))
    assert torch.equal(low, encoder.embedding.weight[0]) and torch.equal(high, encoder.embedding.weight[2])


@pytest.mark.parametrize("text", ["gru", "bow"])
def test_text_features_do_not_depend_on_padding_or_batch(text: str) -> None:
    encoder = make_encoder(spaces.Dict({"mission": text_space()}), text=text).parts["mission"]
    assert isinstance(encoder, TextEncoder)
    alone = encoder(missions("go to the red ball"))
    with_longer = encoder(missions("go to the red ball", "put the blue key next to the grey box on your left"))
    assert torch.allclose(alone[0], with_longer[0], atol=1e-6)


def test_gru_reads_word_order_and_bag_of_words_does_not() -> None:
    space = spaces.Dict({"mission": text_space()})
    texts = missions("go to the red ball", "ball red the to go")
    gru = make_encoder(space, text="gru")(obs_to_tensor({"mission": texts.numpy()}, "cpu"))
    bow = make_encoder(space, text="bow")(obs_to_tensor({"mission": texts.numpy()}, "cpu"))
    assert not torch.allclose(gru[0], gru[1]) and torch.allclose(bow[0], bow[1], atol=1e-6)


def test_text_embedding_covers_the_vocabulary() -> None:
    encoder = make_encoder(BABYAI).parts["mission"]
    assert encoder.embedding.num_embeddings == len(VOCABULARY)


@pytest.mark.parametrize("film", [False, True])
def test_film_makes_the_image_features_depend_on_the_mission(film: bool) -> None:
    encoder = make_encoder(BABYAI, film=film)
    obs = sample_batch(BABYAI, 1)
    obs = {k: v.repeat(2, *([1] * (v.dim() - 1))) for k, v in obs.items()}
    obs["mission"] = missions("go to the red ball", "open the blue door")
    features = encoder(obs)
    # Dict features are concatenated in key order: direction, image, mission.
    start = encoder.parts["direction"].output_dim
    image = features[:, start : start + encoder.parts["image"].output_dim]
    assert torch.allclose(image[0], image[1]) != film


def test_norm_fixes_the_scale_of_the_features_the_core_gets() -> None:
    plain = make_encoder(BABYAI, film=True)
    normed = make_encoder(BABYAI, film=True, norm=True)
    normed.encoder.load_state_dict(plain.state_dict())
    with torch.no_grad():  # weights grown as the FiLM features of a stalled LSTM run had (docs/results.md)
        for encoder in (plain, normed.encoder):
            for p in encoder.parameters():
                p.mul_(3)
    obs = sample_batch(BABYAI, 4)
    big, fixed = plain(obs), normed(obs)
    assert normed.output_dim == plain.output_dim and big.abs().mean() > 10
    torch.testing.assert_close(fixed.mean(-1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(fixed.var(-1, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    torch.testing.assert_close(fixed, torch.nn.functional.layer_norm(big, big.shape[-1:]))


def test_film_needs_an_image_and_a_text() -> None:
    with pytest.raises(UserError, match="film=True needs exactly one image and one text entry"):
        make_encoder(spaces.Dict({"image": GRID, "direction": spaces.Discrete(4)}), film=True)


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        (
            spaces.Tuple((spaces.Discrete(2),)),
            "observation space Tuple(Discrete(2)) is not supported; supported: Box",
        ),
        (spaces.Text(10), "make_env tokenises Text"),
        (spaces.Dict({"a": spaces.Dict({"b": spaces.Discrete(2)})}), "nested Dict spaces are not supported"),
    ],
)
def test_unsupported_observation_spaces(space: spaces.Space, expected: str) -> None:
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        make_encoder(space)


def test_unknown_or_invalid_encoder_options() -> None:
    with pytest.raises(UserError, match="encoder has no option 'hiden_dim'; it takes: hidden_dim"):
        make_encoder(GRID, hiden_dim=3)
    with pytest.raises(UserError, match="'gru' or 'bow'"):
        make_encoder(BABYAI, text="lstm")


def test_obs_to_tensor_keeps_integers_and_makes_floats_32_bit() -> None:
    out = obs_to_tensor(
        {"image": np.zeros((2, 3, 3, 3), np.uint8), "x": np.zeros((2, 4)), "d": np.array([1, 2])}, "cpu"
    )
    assert (out["image"].dtype, out["x"].dtype, out["d"].dtype) == (torch.uint8, torch.float32, torch.int64)


# --- action heads -------------------------------------------------------------------------------------


def test_discrete_head_samples_in_range_with_start_and_starts_near_uniform() -> None:
    head = make_action_head(spaces.Discrete(4, start=1), 16)
    dist = head(torch.randn(64, 16))
    actions = dist.sample()
    assert actions.shape == (64,) and actions.min() >= 1 and actions.max() <= 4
    assert dist.log_prob(actions).shape == (64,) and dist.mode().shape == (64,)
    assert torch.allclose(dist.entropy(), torch.full((64,), math.log(4)), atol=1e-2)


def test_multidiscrete_log_prob_is_the_sum_of_its_components() -> None:
    head = make_action_head(spaces.MultiDiscrete([3, 5]), 8)
    features = torch.randn(10, 8)
    dist = head(features)
    actions = dist.sample()
    assert actions.shape == (10, 2) and (actions[:, 0] < 3).all() and (actions[:, 1] < 5).all()
    logits = head.logits(features).split([3, 5], dim=1)
    expected = sum(torch.log_softmax(logits[k], 1).gather(1, actions[:, k : k + 1])[:, 0] for k in range(2))
    assert torch.allclose(dist.log_prob(actions), expected, atol=1e-6)
    assert dist.entropy().shape == (10,)


def test_categorical_matches_torch_distributions() -> None:
    head = make_action_head(spaces.Discrete(5), 8)
    torch.nn.init.normal_(head.logits.weight)  # far from uniform, so the checks below can fail
    features = torch.randn(4, 8)
    dist, reference = head(features), torch.distributions.Categorical(logits=head.logits(features))
    assert torch.allclose(dist.entropy(), reference.entropy(), atol=1e-6)
    torch.manual_seed(0)
    samples = torch.stack([dist.sample() for _ in range(4000)])  # [4000, 4]
    frequencies = torch.stack([torch.bincount(samples[:, i], minlength=5) / 4000 for i in range(4)])
    assert torch.allclose(frequencies, reference.probs, atol=0.03)
    assert torch.equal(dist.mode(), reference.probs.argmax(1))
    assert torch.allclose(dist.log_prob(samples[0]), reference.log_prob(samples[0]), atol=1e-6)


def test_box_head_is_a_diagonal_gaussian_with_learned_log_std() -> None:
    head = make_action_head(spaces.Box(-2.0, 2.0, (3,), np.float32), 8)
    features = torch.randn(6, 8)
    dist = head(features)
    actions = dist.sample()
    assert actions.shape == (6, 3) and actions.dtype == torch.float32
    mean = head.mean(features)
    expected = torch.distributions.Normal(mean, 1.0).log_prob(actions).sum(1)  # log_std starts at 0
    assert torch.allclose(dist.log_prob(actions), expected, atol=1e-5)
    assert torch.allclose(dist.entropy(), torch.full((6,), 3 * 0.5 * math.log(2 * math.pi * math.e)))
    assert torch.equal(dist.mode(), mean)
    dist.log_prob(actions).sum().backward()
    assert head.log_std.grad is not None and head.log_std.grad.abs().sum() > 0


def test_box_head_with_matrix_actions_sums_over_all_action_dims() -> None:
    dist = make_action_head(spaces.Box(-1.0, 1.0, (2, 2), np.float32), 4)(torch.randn(5, 4))
    actions = dist.sample()
    assert actions.shape == (5, 2, 2) and dist.log_prob(actions).shape == (5,) and dist.entropy().shape == (5,)


@pytest.mark.parametrize(
    "space",
    [spaces.MultiBinary(3), spaces.Tuple((spaces.Discrete(2),)), spaces.Box(0, 5, (2,), np.int64)],
    ids=lambda s: type(s).__name__,
)
def test_unsupported_action_spaces(space: spaces.Space) -> None:
    with pytest.raises(UserError, match="is not supported; supported: Discrete"):
        make_action_head(space, 8)
