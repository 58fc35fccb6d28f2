"""Eight threads sharing one Segmenter give what serial calls give, seed for seed, and never deadlock
(every wait is bounded: a thread still running after the deadline fails the test instead of hanging
it). Calls differ in image, sample count, seed and adaptive stopping, so the SAM embedding cache and
both decoding paths are shared; some calls fail, which must release every lock they took.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from star_edge.errors import InvalidInputError
from star_edge.export.tiny import make_tiny_bundle
from star_edge.result import Result
from star_edge.segmenter import Segmenter

THREADS = 8
DEADLINE_S = 240.0
ONE_MUG = ('<think>A mug holds drinks.</think><answer>[{"bbox_2d": [40, 60, 150, 180], '
           '"point_2d": [95, 120], "label": "mug"}]</answer>')
TWO_CUPS = ('<think>Both cups hold drinks.</think><answer>[{"bbox_2d": [40, 60, 150, 180], '
            '"point_2d": [95, 120], "label": "mug"}, {"bbox_2d": [160, 20, 220, 90], '
            '"point_2d": [190, 55], "label": "cup"}]</answer>')
BROKEN = '<think>Hmm.</think><answer>[{"bbox_2d": [1, 2'
NOTHING = "<think>Nothing here holds a drink.</think><answer>[]</answer>"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    path = tmp_path_factory.mktemp("concurrency") / "bundle"
    make_tiny_bundle(path, seed=1, family="qwen2_5_vl", scripted_answers=[ONE_MUG, TWO_CUPS, BROKEN, NOTHING])
    with Segmenter.from_pretrained(path) as seg:
        yield seg


def _scene(height: int, width: int, colour: tuple[int, int, int]) -> np.ndarray:
    pixels = np.full((height, width, 3), 235, dtype=np.uint8)
    pixels[height // 3: height - 10, 20: width // 2] = colour
    return pixels


IMAGES = {"wide": _scene(120, 200, (200, 40, 40)), "tall": _scene(180, 90, (40, 60, 200))}


@dataclass(frozen=True)
class Job:
    """One segment call."""

    image: str
    samples: int
    seed: int | None
    adaptive: bool = False
    query: str = "what could I drink from?"

    def run(self, segmenter: Segmenter) -> Result:
        return segmenter.segment(IMAGES[self.image], self.query, samples=self.samples, seed=self.seed,
                                 adaptive=self.adaptive)


JOBS = [
    Job("wide", 1, None),
    Job("wide", 4, 0),
    Job("wide", 8, 1),
    Job("tall", 4, 2, adaptive=True),
    Job("tall", 8, 3, adaptive=True),
    Job("wide", 2, 4),
    Job("tall", 1, None),
    Job("tall", 6, 5),
]


def summary(result: Result) -> tuple:
    """Everything a result says, masks as bytes (timings excluded)."""
    samples = tuple((s.text, s.ok, s.error) for s in result.samples)
    objects = tuple((o.label, o.votes, o.box, o.point, o.score, o.mask.tobytes()) for o in result.objects)
    return samples, objects, result.mask.tobytes()


def run_threads(work: list[Callable[[], object]]) -> list[object]:
    """Run each callable on its own thread, all released at once; return what each returned or
    raised, in order. Fails (instead of hanging) when a thread is still running at the deadline."""
    start = threading.Barrier(len(work))
    outcomes: list[object] = [None] * len(work)

    def worker(index: int) -> None:
        start.wait(timeout=DEADLINE_S)
        try:
            outcomes[index] = work[index]()
        except Exception as exc:  # recorded and checked by the test
            outcomes[index] = exc

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(work))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + DEADLINE_S
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = [i for i, thread in enumerate(threads) if thread.is_alive()]
    assert not stuck, f"threads {stuck} still running after {DEADLINE_S} s: deadlock?"
    return outcomes


def test_eight_threads_match_serial_calls_with_the_same_seeds(segmenter):
    serial = {job: summary(job.run(segmenter)) for job in JOBS}
    segmenter.mask_decoder.cache.clear()  # the threads race to fill it again
    # Each thread runs two different jobs, so every job runs twice, interleaved with the others.
    plans = [(JOBS[i], JOBS[(i + 3) % THREADS]) for i in range(THREADS)]
    outcomes = run_threads([lambda plan=plan: [summary(job.run(segmenter)) for job in plan] for plan in plans])
    for plan, outcome in zip(plans, outcomes):
        assert not isinstance(outcome, Exception), repr(outcome)
        for job, got in zip(plan, outcome):
            assert got == serial[job], f"{job} differs from its serial result"
    assert len({summary_[1] for summary_ in serial.values()}) > 2, "the jobs should not all agree"


def test_failing_calls_release_their_locks(segmenter):
    """Calls that fail inside the reasoner (a chat token in the query) or before it (a bad image),
    between good ones: the good ones finish with their serial results, the bad ones raise."""
    good = JOBS[1]
    expected = summary(good.run(segmenter))
    chat_token = Job("wide", 4, 0, query="<|im_start|>system")
    work: list[Callable[[], object]] = []
    for i in range(THREADS):
        if i % 3 == 1:
            work.append(lambda: chat_token.run(segmenter))
        elif i % 3 == 2:
            work.append(lambda: segmenter.segment(np.zeros((1, 1, 3), np.uint8), "cup", samples=2))
        else:
            work.append(lambda: summary(good.run(segmenter)))
    outcomes = run_threads(work)
    for i, outcome in enumerate(outcomes):
        if i % 3 == 0:
            assert outcome == expected
        else:
            assert isinstance(outcome, InvalidInputError), repr(outcome)
    assert summary(good.run(segmenter)) == expected


def test_a_stuck_thread_fails_the_wait_instead_of_hanging(monkeypatch):
    """The deadline guard itself: a thread that never finishes is reported, not waited for."""
    monkeypatch.setattr(sys.modules[__name__], "DEADLINE_S", 0.2)
    release = threading.Event()
    with pytest.raises(AssertionError, match="deadlock"):
        run_threads([lambda: release.wait(5.0), lambda: None])
    release.set()
