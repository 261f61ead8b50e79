"""User-facing errors of the HyperLoRA core.

Every error raised for bad input is a :class:`HyperLoRAError` whose message is
a complete sentence a ComfyUI user can act on: it names the file, image or
setting at fault and says what to do.  ComfyUI shows the message as is.
"""

from __future__ import annotations

from collections.abc import Sequence


class HyperLoRAError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelFileError(HyperLoRAError):
    """A model file or folder is missing, unreadable or not in the released format."""


class DependencyError(HyperLoRAError):
    """An optional dependency (insightface, onnxruntime, transformers) is missing or broken."""


class FaceNotFoundError(HyperLoRAError):
    """No usable face was found in the images given."""


class ImageInputError(HyperLoRAError):
    """An input image cannot be used (wrong shape, empty batch, ...)."""


class IdentityFileError(HyperLoRAError):
    """An identity file is unreadable or was made for another model."""


class SettingError(HyperLoRAError):
    """A setting (a node input or an option) has a value that cannot be used."""


def check_choice(value: str, allowed: Sequence[str], setting: str) -> str:
    """``value`` if it is one of ``allowed``, else :class:`SettingError` naming the setting and the choices."""
    if value not in allowed:
        raise SettingError(f"{setting} is {value!r}; choose one of {', '.join(map(repr, allowed))}.")
    return value


class LoraError(HyperLoRAError):
    """A LoRA does not fit what it is combined with or applied to."""


class QueueError(HyperLoRAError):
    """Queuing a workflow on a ComfyUI server failed (server down, node missing, prompt rejected, run failed)."""


class DownloadError(HyperLoRAError):
    """Downloading or verifying a released model file failed."""


class WorkflowError(HyperLoRAError):
    """A workflow file cannot be read or converted (tools/convert_workflow.py)."""
