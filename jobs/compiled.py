"""What torch.compile did, read from dynamo's and inductor's own counters.

A compiled forward whose graph broke, with frames dynamo could not compile (they then run
eager: a frame past its recompile limit, say) or that inductor ran without CUDA graphs
runs slower than one compiled whole, and torch says so only in logs that are off by
default. The sampler's decode step and the engine's compiled training forward report
what their compiles met through this.
"""

from __future__ import annotations

from collections import Counter


class CompileWatch:
    """What the compiles in a span met (from its creation, or its last :meth:`restart`)."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self._before = self._read()

    @staticmethod
    def _read() -> dict[str, Counter]:
        from torch._dynamo.utils import counters

        frames = counters["frames"]
        return {
            "breaks": Counter(counters["graph_break"]),
            # frames whose conversion failed: dynamo runs them eager (torch's own count)
            "eager_frames": Counter({"": frames["total"] - frames["ok"]}),
            "cudagraph_skips": Counter({"": counters["inductor"]["cudagraph_skips"]}),
            # why dynamo stopped, a graph break or not (also bumped where it recovered)
            "reasons": Counter(counters["unimplemented"]),
        }

    def since(self) -> dict[str, Counter]:
        """What each counter gained over the span, by reason."""
        now = self._read()
        return {kind: now[kind] - self._before[kind] for kind in now}

    def counts(self, on_cuda: bool) -> dict[str, int]:
        """What the span's compiles met, counted (a benchmark's record); CUDA graphs' skips
        on a GPU only (on the CPU inductor counts one for every graph it compiles)."""
        new = self.since()
        kinds = ["breaks", "eager_frames"] + (["cudagraph_skips"] if on_cuda else [])
        return {kind: new[kind].total() for kind in kinds}

    def eager_parts(self) -> str | None:
        """The span's graph breaks and frames run eager, with one of its reasons (dynamo's
        counters keep no order within a span); None where there were none."""
        new = self.since()
        breaks, eager = new["breaks"].total(), new["eager_frames"].total()
        if not (breaks or eager):
            return None
        reason = next(iter(new["reasons"] or new["breaks"]), "").strip().splitlines()
        return (
            f"{breaks} graph break(s), {eager} frame(s) run eager (one reason: "
            f"{reason[0][:200] if reason else 'not counted'}; "
            "TORCH_LOGS=graph_breaks,recompiles says more)"
        )
