"""The teacher's side of the dump: a batch of uint8 views in, its top-k answers out (TeacherRunner), and the
buffers the views are rendered into (OutputRing).

Sampled targets (--targets sampled, docs/cache-format.md "Targets"): the top k as for top-k targets, then m
systematic draws from the other classes with q ~ p^(1/Td) (kdcache.cache.targets.draw_tail; sampled-cv: q ~
|p^(1/Td) - median|), their offset u
one uniform per view from the counter-based RNG, u(key(g, s, i), 700): a view's draws depend on the view
and the teacher's logits only, never on the batch or the order, so a resumed dump writes the same rows."""

from typing import Optional

import numpy as np
import torch

from kdcache.augment.rng import STREAM_TAIL_DRAWS, uniform, view_keys
from kdcache.cache.targets import draw_tail
from kdcache.dist import resolve_amp
from kdcache.models import Normalize, forward_u8


def draw_uniforms(global_seed: int, seeds, samples) -> np.ndarray:
    """(B,) float64 in [0, 1): the draws' offset of each view (samples[b], seeds[b])."""
    return uniform(view_keys(global_seed, np.asarray(seeds, np.uint64), np.asarray(samples, np.uint64)),
                   STREAM_TAIL_DRAWS)


class TeacherRunner:
    """uint8 NHWC views -> (log-probabilities, class indices, log_tail), on the chosen device: the top k and
    the log tail mass; with `samples` = m > 0 the top k then m draws from the tail, and log S (module doc)."""

    def __init__(self, model, info: dict, device: torch.device, amp: str, compile_model: bool, topk: int,
                 samples: int = 0, sample_temperature: float = 1.0, global_seed: int = 0,
                 control_variate: bool = False, values_dtype: str = "uint16"):
        self.device, self.topk = device, topk
        self.samples, self.sample_temperature, self.global_seed = samples, sample_temperature, global_seed
        self.control_variate, self.values_dtype = control_variate, values_dtype
        self.amp_dtype, self.amp = resolve_amp(amp, device)
        self.normalize = Normalize(info["mean"], info["std"]).to(device)
        model = model.to(device, memory_format=torch.channels_last).eval()
        self.model = torch.compile(model) if compile_model else model

    @torch.inference_mode()
    def logits(self, views_nhwc: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(views_nhwc).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        return forward_u8(self.model, self.normalize, x, self.amp_dtype)

    @torch.inference_mode()
    def launch(self, views_nhwc: np.ndarray, seeds=None, samples=None) -> "TopkResult":
        """Start the forward of one batch; on CUDA it returns before the GPU is done, so the caller can
        queue the next batch first (the GPU never waits for the host between batches). seeds, samples: each
        row's view (s, i), which keys its draws (sampled targets only)."""
        logits = self.logits(views_nhwc)
        values, indices = logits.topk(self.topk, dim=1, sorted=True)
        # float64 from the full fp32 logits: the tail mass is summed over its own classes, never taken as
        # 1 - sum(top-k) (at p_top = 0.99 that difference loses most of its digits)
        full = logits.double()
        lse = torch.logsumexp(full, dim=1, keepdim=True)
        logp = values.double() - lse
        if self.topk < logits.shape[1]:
            log_tail = torch.logsumexp(full.scatter(1, indices, -torch.inf), dim=1) - lse[:, 0]
        else:  # no other classes: tail mass 0
            log_tail = torch.full_like(lse[:, 0], -torch.inf)
        if self.samples:
            outputs = self._with_draws(logits, logp, indices, seeds, samples)
        else:
            outputs = (logp.float(), indices, log_tail.float())
        if self.device.type != "cuda":
            return TopkResult(outputs, None)
        # pinned host copies, asynchronous; the event says when they have landed
        host = tuple(t.to("cpu", non_blocking=True) for t in outputs)
        done = torch.cuda.Event()
        done.record()
        return TopkResult(host, done)

    def _with_draws(self, logits: torch.Tensor, logp: torch.Tensor, indices: torch.Tensor, seeds, samples):
        """(k + m log-probabilities, k + m classes, log S): the top k, then the m draws (ascending class);
        sampled-cv: (B, 3) log S, log beta, log A in place of log S."""
        if seeds is None or samples is None or len(seeds) != len(logits):
            raise ValueError("sampled targets need each row's (seed, sample): the draws are keyed by the view")
        u = torch.from_numpy(draw_uniforms(self.global_seed, seeds, samples))
        classes, draw_logp, log_s = draw_tail(logits, indices, self.samples, self.sample_temperature, u,
                                              self.control_variate, self.values_dtype)
        return (torch.cat([logp, draw_logp], 1).float(), torch.cat([indices, classes], 1), log_s.float())

    def topk_outputs(self, views_nhwc: np.ndarray, seeds=None, samples=None):
        """(log-probabilities, class indices, log_tail) of one batch, as numpy arrays (module doc)."""
        return self.launch(views_nhwc, seeds, samples).get()


class TopkResult:
    """A launched batch's outputs; get() waits for them (a no-op off CUDA)."""

    def __init__(self, tensors, done):
        self.tensors, self.done = tensors, done

    def get(self):
        if self.done is not None:
            self.done.synchronize()
        return tuple(t.numpy() for t in self.tensors)


class OutputRing:
    """Rendered-view buffers reused round-robin (pinned memory on CUDA: asynchronous host->device copies)."""

    def __init__(self, slots: int, pinned: bool):
        self.slots, self.pinned = [None] * slots, pinned
        self.i = 0

    def next(self, shape) -> np.ndarray:
        need = int(np.prod(shape))
        j = self.i % len(self.slots)
        self.i += 1
        if self.slots[j] is None or self.slots[j].size < need:
            self.slots[j] = (torch.empty(need, dtype=torch.uint8, pin_memory=True).numpy() if self.pinned
                             else np.empty(need, np.uint8))
        return self.slots[j][:need].reshape(shape)
