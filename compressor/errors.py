"""Typed errors. The CLI prints their message as one line and exits non-zero."""


class CompressorError(Exception):
    """Base class: a problem with the user's input, explained in one line."""

    exit_code = 2


class ModelLoadError(CompressorError):
    """A model, adapter or fusion directory is missing, incomplete or unreadable."""


class UnsupportedAdapterError(CompressorError):
    """An adapter, fusion or head option that would make our modules compute something else."""


class MaskError(CompressorError):
    """A MaskSet that is malformed or was made for another model."""


class PruningConfigError(CompressorError):
    """Bad pruning arguments: unknown method or kind, sparsity outside [0, 1)."""


class OutputExistsError(CompressorError):
    """The output directory exists and --overwrite was not given."""


class ExportError(CompressorError):
    """The model could not be exported to ONNX, or an input is not an ONNX model."""


class ParityError(CompressorError):
    """An exported or compacted model's outputs differ from the masked PyTorch reference beyond atol."""


class ProviderUnavailableError(CompressorError):
    """The requested onnxruntime execution provider is not installed or cannot start on this machine."""


class DataError(CompressorError):
    """A dataset that cannot be read or does not fit the task: missing columns, unknown task, mismatched labels."""


class TrainingError(CompressorError):
    """Bad training arguments or a checkpoint that cannot be resumed."""


class OutputError(CompressorError):
    """The output cannot be written there: not writable, a file in the way, or not ours to replace."""


def as_user_error(exc: BaseException):
    """A one-line CompressorError for an environment error raised while reading or writing files (a full disk, a
    read-only directory, a file where a directory is needed), or None for a bug (which keeps its traceback)."""
    if isinstance(exc, CompressorError):
        return exc
    if isinstance(exc, OSError):
        import errno

        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        reason = exc.strerror or str(exc) or type(exc).__name__
        hint = {errno.ENOSPC: "free some space or choose another --out", errno.EROFS: "choose another --out",
                errno.EACCES: "check the permissions", errno.EPERM: "check the permissions"}.get(exc.errno)
        return OutputError(f"{reason}{where}" + (f": {hint}" if hint else ""))
    if type(exc).__name__ == "SafetensorError":  # safetensors' Rust error: write failures (a full disk) or bad files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return OutputError(f"safetensors could not read or write a file: {first} (check free space and the file)")
    return None
