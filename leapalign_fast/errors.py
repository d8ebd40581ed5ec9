"""The one exception type for user errors: caught at the CLI, printed as one line, non-zero exit; and the one test of
whether an exception means "the disk or file system failed", whichever library raised it."""

from __future__ import annotations

import errno
import os
import re


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, ...). The message names the thing and the fix."""


class TrainingDiverged(Exception):
    """Too many consecutive non-finite steps; the last good checkpoint is left in place."""


# A full disk or quota, a read-only or unwritable file system, an I/O error of the device.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})
_BY_STRERROR = {os.strerror(n): n for n in errno.errorcode}
_OS_ERROR = re.compile(r"\(os error (\d+)\)(?: at path \"([^\"]*)\")?")  # safetensors' Rust io::Error text
_STRERROR = re.compile(r"strerror: ([^\n]+?)\s*$", re.MULTILINE)  # torch.save's C++ writer: "open file failed ..."


def disk_failure(error: BaseException | None) -> OSError | None:
    """The disk or file-system failure behind `error`, as an OSError (errno, strerror, filename), or None when it is
    something else. Recognised: an OSError with errno ENOSPC, EDQUOT, EROFS, EACCES, EPERM or EIO; safetensors'
    SafetensorError whose message carries such an `(os error N)`; torch.save's RuntimeError from its C++ writer
    (a short write, "unexpected pos": the disk filled up; or a failed open with the errno's text); any of these as
    the cause or context of another exception, or as one rank's failure inside torch.distributed.checkpoint's
    CheckpointException. Nothing here imports torch or safetensors: types are matched by name."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        found = _one(e)
        if found is not None:
            return found
        failures = getattr(e, "failures", None)  # DCP: {rank: (exception, traceback summary)}
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) and f else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return None


def _one(e: BaseException) -> OSError | None:
    if isinstance(e, OSError):
        return e if e.errno in DISK_ERRNOS else None
    text = str(e)
    if type(e).__name__ == "SafetensorError":
        m = _OS_ERROR.search(text)
        if m and int(m.group(1)) in DISK_ERRNOS:
            code = int(m.group(1))
            return OSError(code, os.strerror(code), m.group(2))
        return None
    if isinstance(e, RuntimeError) and "inline_container" in text:  # torch.save's PyTorchStreamWriter
        if "unexpected pos" in text or "file write failed" in text:
            return OSError(errno.ENOSPC, "a write came up short (No space left on device?)")
        m = _STRERROR.search(text)
        if m and _BY_STRERROR.get(m.group(1)) in DISK_ERRNOS:
            code = _BY_STRERROR[m.group(1)]
            return OSError(code, os.strerror(code))
    return None


def disk_reason(e: OSError) -> str:
    """A few words for the failure: 'the disk is full' for ENOSPC/EDQUOT, else the system's text."""
    return "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
