"""Media decoding in a child process: a video that crashes or hangs the decoder costs a 422,
never the gateway replica."""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from ddft.adapters.registry import Manifest
from ddft.config import DataConfig
from ddft.data.media import MediaError, load_image, sample_frames
from ddft.errors import Invalid

DECODE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Sampling:
    """How a video is sampled for the model: as its adapter was trained to see videos."""

    frames: int = DataConfig.model_fields["frames"].default  # the base's and an upload's: the training default
    strategy: str = "uniform"

    @classmethod
    def of(cls, manifest: Manifest | None) -> Sampling:
        """The adapter's sampling (its manifest's frames and frame_strategy); "steps" follows a
        recipe's annotated step spans, which a served video has none of: uniform then."""
        if manifest is None or manifest.frames is None:
            return cls()
        strategy = manifest.frame_strategy if manifest.frame_strategy in ("uniform", "keyframe") else "uniform"
        return cls(manifest.frames, strategy)


def _decode(kind: str, data: bytes, sampling: Sampling):
    """Runs in the decoder process: ("ok", array) or ("error", reason, message); never raises."""
    try:
        if kind == "video":
            return ("ok", sample_frames(data, sampling.frames, strategy=sampling.strategy))
        return ("ok", load_image(data))
    except MediaError as err:
        return ("error", err.reason, str(err))
    except Exception as err:  # a decoder bug on odd input is still a bad file, not a server fault
        return ("error", "undecodable_" + kind, f"{type(err).__name__}: {str(err)[:200]}")


def _warm() -> bool:
    return True


class Decoder:
    """A one-process pool for media decoding; rebuilt if a file kills or hangs the decoder."""

    def __init__(self):
        self._pool: ProcessPoolExecutor | None = None

    def _get(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def _reset(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            for proc in list(getattr(pool, "_processes", {}).values()):  # a hung decoder must go
                proc.kill()
            pool.shutdown(wait=False, cancel_futures=True)

    def warm(self, timeout: float = 120.0) -> None:
        """Start the decoder process now, so the first upload doesn't wait for it."""
        self._get().submit(_warm).result(timeout=timeout)

    async def __call__(self, kind: str, data: bytes, sampling: Sampling = Sampling()):
        loop = asyncio.get_running_loop()
        try:
            job = loop.run_in_executor(self._get(), _decode, kind, data, sampling)
            out = await asyncio.wait_for(job, DECODE_TIMEOUT_S)
        except BrokenProcessPool:
            self._reset()
            raise Invalid(
                f"the {kind} crashed the decoder: it is damaged or not "
                f"a supported format; re-encode it (e.g. ffmpeg -i in -c:v libx264 out.mp4)",
                f"undecodable_{kind}",
            ) from None
        except TimeoutError:
            self._reset()
            raise Invalid(
                f"decoding the {kind} took over {DECODE_TIMEOUT_S:.0f}s; send a shorter or re-encoded file",
                f"undecodable_{kind}",
            ) from None
        if out[0] == "error":
            _, reason, message = out
            wanted = (
                f"a video (mp4, webm, mov ...) of at least {sampling.frames} frames"
                if kind == "video"
                else "a JPEG, PNG or WebP image"
            )
            raise Invalid(f"{message}; send {wanted}", reason)
        return out[1]
