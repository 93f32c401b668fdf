"""Media decoding in a child process: a video that crashes or hangs the decoder costs a 422,
never the gateway replica."""

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from ddft.data.media import MediaError, load_image, sample_frames
from serve.errors import ApiError

DECODE_TIMEOUT_S = 60.0
FRAMES = 8  # frames sampled per video, as the base was trained


def _decode(kind: str, data: bytes):
    """Runs in the decoder process: ("ok", array) or ("error", reason, message); never raises."""
    try:
        return ("ok", sample_frames(data, FRAMES) if kind == "video" else load_image(data))
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

    async def __call__(self, kind: str, data: bytes):
        loop = asyncio.get_running_loop()
        try:
            out = await asyncio.wait_for(loop.run_in_executor(self._get(), _decode, kind, data), DECODE_TIMEOUT_S)
        except BrokenProcessPool:
            self._reset()
            raise ApiError(
                422,
                f"undecodable_{kind}",
                f"the {kind} crashed the decoder: it is damaged or not "
                f"a supported format; re-encode it (e.g. ffmpeg -i in -c:v libx264 out.mp4)",
            ) from None
        except TimeoutError:
            self._reset()
            raise ApiError(
                422,
                f"undecodable_{kind}",
                f"decoding the {kind} took over {DECODE_TIMEOUT_S:.0f}s; send a shorter or re-encoded file",
            ) from None
        if out[0] == "error":
            _, reason, message = out
            wanted = (
                f"a video (mp4, webm, mov ...) of at least {FRAMES} frames"
                if kind == "video"
                else "a JPEG, PNG or WebP image"
            )
            raise ApiError(422, reason, f"{message}; send {wanted}")
        return out[1]
