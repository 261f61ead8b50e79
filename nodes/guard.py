"""Input checks applied to every node of the pack when it is registered (see ``nodes/__init__.py``).

Node authors do nothing: :func:`guard_nodes` wraps each registered class's ``FUNCTION`` so that

* every ``FLOAT`` input declared in ``INPUT_TYPES`` (required or optional, widget or link) must be a
  finite number: ComfyUI's own min/max validation lets NaN through (every comparison with NaN is
  False) and does not look at linked values at all;
* every ``STRING`` input named ``filename_prefix`` (or ending in it) passes
  :func:`hyperlora.checks.check_filename_prefix`;

both raise :class:`~hyperlora.errors.SettingError` naming the input and the node before the node
runs.  A class with a ``filename_prefix`` input also gets the prefix check in its ``VALIDATE_INPUTS``
(see :func:`_install_validation`), so a bad prefix typed into the widget is refused when the prompt
is queued; and a socket check (``nodes.common.guard_sockets``) on an ``INPUT_IS_LIST`` node is made to
take the lists ComfyUI then passes.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

from ..hyperlora.checks import check_filename_prefix, check_finite
from ..hyperlora.errors import SettingError

log = logging.getLogger(__name__)

PREFIX_INPUT = "filename_prefix"
_GUARDED = "__hyperlora_guarded__"       # marks a wrapped FUNCTION
_NAMES: dict[type, tuple[str, str]] = {}  # class -> (node id, display name)


def declared_inputs(cls: type) -> dict[str, tuple]:
    """``{name: (type, options)}`` of the required and optional inputs of a node class."""
    types = cls.INPUT_TYPES()
    return {**types.get("required", {}), **types.get("optional", {})}


def float_inputs(cls: type) -> dict[str, dict[str, Any]]:
    """``{name: options}`` of the class's FLOAT inputs."""
    return {name: dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
            for name, spec in declared_inputs(cls).items() if spec and spec[0] == "FLOAT"}


def prefix_inputs(cls: type) -> list[str]:
    """The class's STRING inputs that name a file to write (``filename_prefix``, ``*_filename_prefix``)."""
    return [name for name, spec in declared_inputs(cls).items()
            if spec and spec[0] == "STRING" and name.endswith(PREFIX_INPUT)]


@functools.lru_cache(maxsize=None)
def _plan(cls: type) -> tuple[dict[str, dict[str, Any]], tuple[str, ...]]:
    """What to check for ``cls`` (declared inputs are static; INPUT_TYPES may scan folders, so once)."""
    return float_inputs(cls), tuple(prefix_inputs(cls))


def output_folder(cls: type) -> str | None:
    """The folder a saving node writes into (its ``output_folder()``), whose file system's name limit the
    prefix check uses; None for a node without one (the common 255-byte limit)."""
    get = getattr(cls, "output_folder", None)
    return str(get()) if callable(get) else None


def node_label(cls: type) -> str:
    node_id, display = _NAMES.get(cls, (cls.__name__, cls.__name__))
    return f"{display} ({node_id})"


def _values(value: Any, as_list: bool) -> Iterable[Any]:
    return value if as_list and isinstance(value, list) else (value,)


def check_inputs(cls: type, arguments: dict[str, Any]) -> None:
    """SettingError for the first FLOAT input of ``cls`` that is not finite, or a bad file-name prefix.

    ``arguments`` maps input names to what the node receives (lists with ``INPUT_IS_LIST``);
    inputs that are absent or None (an unconnected optional input) are not checked.
    """
    floats, prefixes = _plan(cls)
    as_list = bool(getattr(cls, "INPUT_IS_LIST", False))
    where = node_label(cls)
    for name, options in floats.items():
        for value in _values(arguments.get(name), as_list):
            if value is not None:
                check_finite(value, name, where=where, low=options.get("min"), high=options.get("max"),
                             default=options.get("default"))
    for name in prefixes:
        for value in _values(arguments.get(name), as_list):
            if value is not None:
                check_filename_prefix(value, name, where=where, folder=output_folder(cls))


def _arguments(signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by input name (a ``**kwargs`` parameter is flattened)."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return dict(kwargs)   # the node's own call will report the mismatch
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _wrap(function: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(function)

    if inspect.iscoroutinefunction(function):
        @functools.wraps(function)
        async def checked_async(self: Any, *args: Any, **kwargs: Any) -> Any:
            check_inputs(type(self), _arguments(signature, (self, *args), kwargs))
            return await function(self, *args, **kwargs)

        wrapper: Callable[..., Any] = checked_async
    else:
        @functools.wraps(function)
        def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
            check_inputs(type(self), _arguments(signature, (self, *args), kwargs))
            return function(self, *args, **kwargs)

        wrapper = checked
    setattr(wrapper, _GUARDED, True)
    return wrapper


def _validate_prefix(cls: type, filename_prefix: str | None = None) -> bool | str:
    """ComfyUI's VALIDATE_INPUTS hook for a typed-in ``filename_prefix`` (None: it comes from a link)."""
    if filename_prefix is None:
        return True
    try:
        check_filename_prefix(filename_prefix, where=node_label(cls), folder=output_folder(cls))
    except SettingError as exc:
        return str(exc)
    return True


def _install_validation(cls: type) -> None:
    """Give ``cls`` a ``VALIDATE_INPUTS`` that checks a typed-in ``filename_prefix`` at queue time.

    A node without one gets :func:`_validate_prefix`.  A node with the socket check of
    ``nodes.common.guard_sockets`` (``VALIDATE_INPUTS(input_types)``) gets both in one function
    (ComfyUI calls only one; it lists a failure under every input the function takes, so a wrong wire's
    message, which names its input, shows under filename_prefix too).  With ``INPUT_IS_LIST`` ComfyUI
    hands the validation lists as well: each element is checked.  A node's own validation with other
    arguments is left as it is (its prefix is still checked when it runs).
    """
    existing = getattr(cls, "VALIDATE_INPUTS", None)
    has_prefix = PREFIX_INPUT in declared_inputs(cls)
    if existing is None:
        if has_prefix:
            cls.VALIDATE_INPUTS = classmethod(_validate_prefix)
        return
    if getattr(existing, _GUARDED, False) or inspect.getfullargspec(existing).args[1:] != ["input_types"]:
        return
    as_list = bool(getattr(cls, "INPUT_IS_LIST", False))
    if not (has_prefix or as_list):
        return

    def each(value: Any) -> list[Any]:
        return value if as_list and isinstance(value, list) else [value]

    def validate(node_cls: type, input_types: Any = None, filename_prefix: Any = None) -> bool | str:
        for prefix in each(filename_prefix):
            answer = _validate_prefix(node_cls, prefix)
            if answer is not True:
                return answer
        for types in each(input_types) if input_types is not None else []:
            answer = existing(input_types=types)
            if answer is not True:
                return answer
        return True

    if has_prefix:
        def VALIDATE_INPUTS(node_cls: type, input_types: Any = None, filename_prefix: Any = None) -> bool | str:  # noqa: N802
            return validate(node_cls, input_types, filename_prefix)
    else:
        def VALIDATE_INPUTS(node_cls: type, input_types: Any = None) -> bool | str:  # type: ignore[misc]  # noqa: N802
            return validate(node_cls, input_types)
    setattr(VALIDATE_INPUTS, _GUARDED, True)
    cls.VALIDATE_INPUTS = classmethod(VALIDATE_INPUTS)


def is_guarded(cls: type) -> bool:
    function = getattr(cls, getattr(cls, "FUNCTION", "") or "", None)
    return bool(getattr(function, _GUARDED, False))


def guard_node(node_id: str, display_name: str, cls: type) -> None:
    """Wrap ``cls``'s FUNCTION with :func:`check_inputs` (once) and add the prefix validation."""
    _NAMES[cls] = (node_id, display_name)
    if not isinstance(getattr(cls, "FUNCTION", None), str) or not callable(getattr(cls, cls.FUNCTION, None)):
        # not a classic (V1) node: left as it is, and tests/comfy/test_guard.py reports it unguarded
        log.warning("HyperLoRA: node %s has no classic FUNCTION; its inputs are not checked", node_id)
        return
    if not is_guarded(cls):
        setattr(cls, cls.FUNCTION, _wrap(getattr(cls, cls.FUNCTION)))
    _install_validation(cls)


def guard_nodes(classes: dict[str, type], display_names: dict[str, str]) -> None:
    """:func:`guard_node` for every registered node."""
    for node_id, cls in classes.items():
        guard_node(node_id, display_names.get(node_id, node_id), cls)


__all__ = ["check_inputs", "declared_inputs", "float_inputs", "guard_node", "guard_nodes", "is_guarded",
           "prefix_inputs"]
