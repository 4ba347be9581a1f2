"""Text observations as fixed-length token ids, with one vocabulary shared by every process.

Vector envs (shared memory, subprocesses) and rollout buffers need fixed-size arrays, so a mission string
becomes ``MISSION_LENGTH`` int64 token ids (pad 0, unknown word 1). The vocabulary is BabyAI's grammar and
MiniGrid's mission words, sorted, never grown in first-seen order: ids are the same in every worker and
every run, and :data:`VOCABULARY` can be saved with the model.
"""

from __future__ import annotations

import re
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from minigrid.core.constants import COLOR_NAMES
from minigrid.envs.babyai.core.verifier import LOC_NAMES, OBJ_TYPES

PAD, UNKNOWN = 0, 1

# The fixed words of BabyAI's instruction surfaces (minigrid/envs/babyai/core/verifier.py: ObjDesc.surface
# and the GoTo/Pickup/Open/PutNext/Before/After/And instructions); colours, object types and locations
# come from minigrid itself. The last line holds the other words of MiniGrid's varying missions (Fetch,
# LockedRoom, PutNear), so every built-in mission is known. Adding a word shifts the ids after it: a model
# trained with the old list (checkpoints save it) no longer reads these ids.
_GRAMMAR_WORDS = [
    *("a", "the", "object", "in", "front", "of", "you", "behind", "on", "your"),
    *("go", "to", "pick", "up", "open", "put", "next", "then", "after", "and"),
    *("fetch", "get", "must", "from", "room", "unlock", "goal", "near"),
]

VOCABULARY: list[str] = [
    "<pad>",
    "<unk>",
    *sorted(set(_GRAMMAR_WORDS) | set(COLOR_NAMES) | set(OBJ_TYPES) | set(LOC_NAMES)),
]
"""Token of each id: 0 pads, 1 stands for any unknown word, then BabyAI's and MiniGrid's words, sorted."""

_TOKEN_ID = {word: i for i, word in enumerate(VOCABULARY)}

MISSION_LENGTH = 64
"""Token slots of a mission. BabyAI's longest (BossLevel: two ``and`` pairs of 15-word ``put the red ball
in front of you next to the blue key on your left`` joined by ``after you``) is 64 words."""

TEXT_KEY = "mission"
"""Dict key under which a top-level ``Text`` observation is put once tokenised (encoders read text there)."""


def tokenize(text: str, length: int = MISSION_LENGTH) -> np.ndarray:
    """Token ids of ``text``: int64 of ``length``, padded with 0; words past ``length`` are dropped.

    Words are the lower-case letter runs of the text (punctuation is not a token), as in BabyAI.
    """
    ids = [_TOKEN_ID.get(word, UNKNOWN) for word in re.findall("[a-z]+", text.lower())][:length]
    out = np.zeros(length, dtype=np.int64)
    out[: len(ids)] = ids
    return out


def detokenize(ids: np.ndarray) -> str:
    """The words of token ids, pads dropped (for logs and tests)."""
    return " ".join(VOCABULARY[i] for i in ids if i != PAD)


def text_space(length: int = MISSION_LENGTH) -> spaces.Box:
    """The space of :func:`tokenize`'s output."""
    return spaces.Box(0, len(VOCABULARY) - 1, shape=(length,), dtype=np.int64)


def has_text(space: spaces.Space) -> bool:
    """True when ``space`` is a ``Text`` or a ``Dict`` with a ``Text`` entry."""
    if isinstance(space, spaces.Dict):
        return any(isinstance(s, spaces.Text) for s in space.values())
    return isinstance(space, spaces.Text)


class TokenizeText(gym.ObservationWrapper):
    """Turns ``Text`` observations into token ids: a top-level ``Text`` becomes ``{"mission": ids}``,
    a ``Text`` entry of a ``Dict`` becomes ids under its own key.

    :param env: an env whose observation space satisfies :func:`has_text`.
    :param length: token slots of each text.
    """

    def __init__(self, env: gym.Env, length: int = MISSION_LENGTH):
        super().__init__(env)
        self._length = length
        source = env.observation_space
        if isinstance(source, spaces.Text):
            self.observation_space = spaces.Dict({TEXT_KEY: text_space(length)})
        else:
            self.observation_space = spaces.Dict(
                {k: text_space(length) if isinstance(s, spaces.Text) else s for k, s in source.items()}
            )

    def observation(self, observation: Any) -> dict[str, Any]:
        if isinstance(observation, str):
            return {TEXT_KEY: tokenize(observation, self._length)}
        return {k: tokenize(v, self._length) if isinstance(v, str) else v for k, v in observation.items()}
