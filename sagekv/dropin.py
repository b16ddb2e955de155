"""Drop-in use: a policy's cache for a model the user already holds, in their own generation loop.

Each function sets the model up (once) and returns a fresh cache for one prompt; the cache keeps the
whole prompt, observes its last queries, and compresses with the policy when the first generated token
comes in, as :meth:`sagekv.SageModel.generate` does after its prefill.
"""

from __future__ import annotations

from .backends import get_backend
from .errors import SageKVError
from .generate import check_policy


def cache_for(model, policy):
    """A transformers ``Cache`` for ``model.generate(input_ids, past_key_values=cache, ...)`` (any sampling
    settings; batch size 1, one prompt per cache).

    It sets ``model``'s attention implementation to sagekv's, which runs SDPA for any other cache (so
    the model stays usable as with ``attn_implementation="sdpa"``), and wraps ``model.forward`` so a call
    given this cache attends through it. generate's first one-token step after the prompt is taken as the
    first decode step (so ``prefill_chunk_size`` must not leave a last chunk of one token).
    """
    check_policy(policy)
    return get_backend("torch").cache_for(model, policy)


def prompt_cache_for(model, policy):
    """A list of per-layer caches for ``mlx_lm.generate(model, tokenizer, prompt, prompt_cache=cache)`` and
    ``stream_generate`` (one prompt per cache).

    It routes the attention of ``model``'s module through sagekv (for any other cache it stays
    mlx-lm's own). mlx-lm runs the prompt but its last token in chunks, evaluating the cache after each,
    then the last token alone: the one-token step after that is the first decode step.
    """
    check_policy(policy)
    return get_backend("mlx").prompt_cache_for(model, policy)


class OnePrompt:
    """The step rule of both backends' drop-in layer caches (mixed into their SageLayer and SageKVCache):
    one sequence; the prompt in any steps; then one token per step, the first of which compresses the layer
    with the policy, its prompt's last queries observed."""

    maker: str  # the function that makes these caches, for messages

    def serve(self, policy, index: int) -> None:
        """Serve one prompt under ``policy`` as layer ``index``."""
        self.policy, self.index = policy, index
        self.selected = False

    def before_step(self, batch: int, steps: int, decoding: bool) -> None:
        """Check a step of ``batch`` sequences of ``steps`` tokens and, when it is the first decode step,
        compress first. ``decoding``: whether a one-token step now is a decode step, which each backend
        tells from how its library's loop runs the prompt."""
        if batch != 1:
            raise SageKVError(f"a sagekv cache holds one sequence, got a batch of {batch} (batches, beams and "
                              "several sequences per prompt are not supported)")
        if self.selected and steps != 1:
            raise SageKVError(f"after its prompt a sagekv cache takes one token per step, got {steps} (a second prompt "
                              f"needs a new cache from {self.maker}; assisted and speculative decoding are not supported)")
        if not self.selected and steps == 1 and decoding:
            if self.queries is None:
                raise SageKVError("attention was not routed through sagekv: this model's family is not supported")
            self.compress(self.policy, self.index)
            self.selected = True
