"""Which errors of a library loading a part (open_clip, transformers, diffusers) mean that what the config names is
wrong: a file or folder missing or unreadable, a name no hub or registry knows, a config or checkpoint that does not
fit, a package the library needs for it missing or of another version (an ``ImportError`` naming a module outside
mmllm). Those become the part's :class:`~mmllm.config.ConfigError` (one line naming the option, exit code 2). Any other
kind (``AttributeError``, ``TypeError``, ``NameError``, an ``ImportError`` of mmllm's own modules, an assertion inside a library) is a fault of
mmllm or of the library, raised as it is: exit code 70 and its traceback, which says where; so is running out of
memory (:func:`mmllm.memory.is_out_of_memory`), which the command reports as such.
"""

from __future__ import annotations

import pickle
import sys
import zipfile

from safetensors import SafetensorError

from mmllm.memory import is_out_of_memory

# what the libraries raise for what they were given: FileNotFoundError and the hub's errors (OSError), an unknown
# model or a config value refused (ValueError, KeyError), open_clip's "Model config for X not found" and torch's
# state-dict size mismatch (RuntimeError), a damaged or truncated weights file (safetensors' SafetensorError,
# torch.load's UnpicklingError, EOFError, BadZipFile)
INPUT_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, RuntimeError, SafetensorError,
                                                 pickle.UnpicklingError, EOFError, zipfile.BadZipFile)


# what a library raises building a part from the architecture the config spells out itself (open_clip's
# model_config, hf-audio's config) where its sizes do not fit together: a key its classes lack or a value of
# another type (TypeError), a size of 0 (ZeroDivisionError), per-layer lists of different lengths (IndexError), a
# library's own check of its sizes (AssertionError). Only there: loading a named model, they are faults.
ARCHITECTURE_ERRORS: tuple[type[BaseException], ...] = (TypeError, ArithmeticError, IndexError, AssertionError)


def _hub_input_errors() -> tuple[type[BaseException], ...]:
    """huggingface_hub's errors that derive from none of :data:`INPUT_ERRORS`: a config value its strict
    dataclasses refuse (transformers' configs validate with them), a file missing from a repository. Read from the
    module where the library loaded it (mmllm does not import huggingface_hub itself, a dependency of its
    dependencies); none where it was never imported, when nothing of it raised either."""
    errors = sys.modules.get("huggingface_hub.errors")
    names = ("StrictDataclassError", "EntryNotFoundError")
    return tuple(cls for cls in (getattr(errors, name, None) for name in names) if isinstance(cls, type))


def names_something_wrong(exc: BaseException, *also: type[BaseException]) -> bool:
    """Whether ``exc``, raised by a library loading a part, says that what it was given is wrong (see the module);
    ``also``: kinds that mean so at this call (``TypeError`` where the user's own mapping is passed as keyword
    arguments, so that an unknown key is one)."""
    if is_out_of_memory(exc):
        return False
    return isinstance(exc, (*INPUT_ERRORS, *_hub_input_errors(), *also)) or _package_missing(exc)


def _package_missing(exc: BaseException) -> bool:
    """An ``ImportError`` of a package other than mmllm: what this environment lacks (transformers' "requires the
    following packages ... pip install X", a model's optional dependency) or has in another version ("cannot
    import name"), which installing the package fixes; one of mmllm's own modules is mmllm's fault."""
    if not isinstance(exc, ImportError):
        return False
    module = exc.name or ""
    return not (module == "mmllm" or module.startswith("mmllm."))


def said(exc: BaseException) -> str:
    """``exc`` as the end of a part's config error: its text, with its kind where the text alone says nothing
    (``EOFError`` has none, a ``KeyError`` only the key: "101")."""
    text = str(exc)
    return text if len(text.split()) > 1 else f"{type(exc).__name__}{': ' if text else ''}{text}"
