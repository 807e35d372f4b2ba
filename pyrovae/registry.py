"""Registries: `kind` string -> small class with a validated `Spec`, built-in or a user's plugin.

Priors, likelihoods, networks, guides and whole models are each a registry of classes. Every class
carries a pydantic `Spec` whose `kind` field is a `Literal`; the config schema is the
discriminated union of the registered specs, so adding a prior is one class in `priors.py` (and
its test) — or one class in the user's own file, found in one of three ways:

| how | config says | what is imported |
|---|---|---|
| import path | `kind = "package.module:ClassName"` | `package.module` from the Python environment (installed packages, `PYTHONPATH`) |
| entry point | `kind = "short_name"` | the object an installed distribution declares under the group `pyrovae.priors` (`.likelihoods`, `.networks`, `.guides`, `.models`) as `short_name` |
| plugin file | `kind = "short_name"` | a file the user passes explicitly (`--plugin FILE`, `pyrovae.load_plugin(FILE)`) whose classes register themselves with `@PRIORS.register` (etc.) |

A plugin class must subclass the registry's base class (`Prior`, `Likelihood`, `Guide`,
`torch.nn.Module`) and define a nested `Spec(pyrovae.registry.Spec)`: its fields are the options
the config may set, validated exactly like the built-in ones. Every registry remembers where a
plugin came from (`origin`): the import path or file, and the SHA-256 of its source file, which a
run folder records so that a changed plugin is noticed when the run is loaded.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import re
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from pyrovae.errors import ConfigError

T = TypeVar("T")

#: `package.module:ClassName` (dotted module path, a colon, a dotted attribute path)
IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class Spec(BaseModel):
    """Base of every building block's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def source_sha256(obj: Any) -> str | None:
    """SHA-256 of the source file that defines `obj` (a class or module), if it has one."""
    try:
        path = inspect.getsourcefile(obj) or inspect.getfile(obj)
    except (TypeError, OSError):
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


class Registry(Generic[T]):
    """Maps `kind` to a class that has a `Spec` (pydantic model with a `kind` literal).

    `base`: the class every member must subclass; `group`: the entry-point group searched for
    short names that are not registered (e.g. `"pyrovae.priors"`).
    """

    def __init__(self, what: str, group: str | None = None, base: type | None = None) -> None:
        self.what, self.group, self.base = what, group, base
        self._classes: dict[str, type[T]] = {}
        self._specs: dict[str, type[Spec]] = {}
        #: kind -> where a plugin came from: {"import" or "file", "sha256"}; built-ins absent
        self.origin: dict[str, dict[str, str | None]] = {}
        #: bumped on every registration (the config schema is rebuilt when it changes)
        self.version = 0

    def register(self, cls: type[T]) -> type[T]:
        """Register `cls` under its `Spec`'s `kind` (usable as a class decorator).

        A plugin may not take a built-in kind; registering a plugin kind again (its file
        loaded anew) replaces the earlier class."""
        spec = self._check(cls, "")
        kind = spec.model_fields["kind"].default
        if not isinstance(kind, str):
            raise ConfigError(
                f"{self.what} plugin {_qualname(cls)}: its Spec needs a field "
                '`kind: Literal["name"] = "name"`'
            )
        old = self._classes.get(kind)
        if old is not None and old is not cls and old.__module__.startswith("pyrovae."):
            raise ConfigError(
                f"{self.what} plugin {_qualname(cls)}: kind {kind!r} is a built-in {self.what}; "
                "choose another name"
            )
        # a plugin loaded again (a new version of its file, say) replaces the earlier one
        self.origin.pop(kind, None)
        self._add(kind, cls, spec)
        return cls

    def _add(self, kind: str, cls: type[T], spec: type[Spec]) -> None:
        self._classes[kind], self._specs[kind] = cls, spec
        if not cls.__module__.startswith("pyrovae."):
            module = inspect.getmodule(cls)
            where = getattr(module, "__file__", None) if module else None
            self.origin.setdefault(kind, {"import": f"{cls.__module__}:{cls.__qualname__}"})
            self.origin[kind].update(file=where, sha256=source_sha256(cls))
        self.version += 1

    def _check(self, cls: Any, key: str) -> type[Spec]:
        """The class's `Spec`, after checking it is a class of the right base with a `Spec`."""
        where = f"{key}: " if key else ""
        if not isinstance(cls, type):
            raise ConfigError(f"{where}{_qualname(cls)} is not a class; expected a {self.what} class")
        if self.base is not None and not issubclass(cls, self.base):
            raise ConfigError(
                f"{where}{_qualname(cls)} is not a {self.what}: expected a subclass of "
                f"{self.base.__module__}.{self.base.__qualname__}"
            )
        spec = getattr(cls, "Spec", None)
        if not (isinstance(spec, type) and issubclass(spec, Spec)) or "kind" not in spec.model_fields:
            raise ConfigError(
                f"{where}{_qualname(cls)} has no Spec: expected a nested class "
                "`Spec(pyrovae.registry.Spec)` with a `kind` field and the options it accepts"
            )
        return spec

    # -- lookup --------------------------------------------------------------------------
    def kinds(self) -> list[str]:
        return list(self._classes)

    def __contains__(self, kind: object) -> bool:
        return kind in self._classes

    def __getitem__(self, kind: str) -> type[T]:
        return self._classes[kind]

    def spec(self, kind: str) -> type[Spec]:
        """The `Spec` class a config entry of this `kind` is validated with."""
        return self._specs[kind]

    def resolve(self, kind: str, key: str) -> type[T] | None:
        """The class for `kind`, importing a plugin if needed; None for an unknown short name
        (the config validation then lists the allowed kinds). `key` (e.g. `"model.prior.kind"`)
        names the config entry in errors."""
        if kind in self._classes:
            return self._classes[kind]
        if ":" in kind:
            return self._import(kind, key)
        return self._entry_point(kind, key)

    def _import(self, path: str, key: str) -> type[T]:
        if not IMPORT_PATH.match(path):
            raise ConfigError(
                f"{key}: {path!r} is not an import path: expected 'package.module:ClassName'"
            )
        module_name, attr = path.split(":")
        try:
            obj: Any = importlib.import_module(module_name)
        except Exception as e:  # noqa: BLE001 - any failure of the user's module is a config error
            raise ConfigError(
                f"{key}: cannot import module {module_name!r} for the {self.what} {path!r}: "
                f"{type(e).__name__}: {_first_line(e)} (plugins are imported from the Python "
                "environment: install the package or add its folder to PYTHONPATH, or pass the "
                "file with --plugin)"
            ) from None
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ConfigError(
                    f"{key}: module {module_name!r} has no attribute {attr!r} "
                    f"(expected the {self.what} class named in {path!r})"
                )
            obj = getattr(obj, part)
        spec = self._check(obj, key)
        # the class may also be registered under its own short kind; the config names the path
        derived = create_model(
            spec.__name__, __base__=spec, __module__=spec.__module__, kind=(Literal[path], path)
        )
        self._add(path, obj, derived)
        self.origin[path]["import"] = path
        return obj

    def _entry_point(self, name: str, key: str) -> type[T] | None:
        if self.group is None:
            return None
        found = [ep for ep in importlib.metadata.entry_points(group=self.group) if ep.name == name]
        if not found:
            return None
        ep = found[0]
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                f"{key}: the entry point {name!r} ({ep.value}, group {self.group}) does not "
                f"load: {type(e).__name__}: {_first_line(e)}"
            ) from None
        if name in self._classes:  # loading the module registered it with a decorator
            return self._classes[name]
        spec = self._check(obj, key)
        declared = spec.model_fields["kind"].default
        if declared != name:
            raise ConfigError(
                f"{key}: the entry point {name!r} ({ep.value}) names a class whose Spec has "
                f"kind = {declared!r}; expected kind = {name!r}"
            )
        self._add(name, obj, spec)
        self.origin[name]["import"] = ep.value
        return obj

    def spec_type(self) -> Any:
        """The pydantic type accepting any registered spec, chosen by its `kind` field."""
        specs = tuple(self._specs.values())
        if len(specs) == 1:
            return specs[0]
        return Annotated[Union[specs], Field(discriminator="kind")]  # noqa: UP007

    def build(self, spec: Spec, *args: Any, **kwargs: Any) -> T:
        return self._classes[spec.kind](spec, *args, **kwargs)  # type: ignore[attr-defined]


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else "")[:200]


_LOADED_FILES: dict[Path, Any] = {}


def load_plugin(path: str | Path) -> Any:
    """Import a plugin file the user names explicitly (`--plugin FILE`); return the module.

    Its classes register themselves (`@PRIORS.register` etc.), so a config can then name them
    by their short `kind`. The module is imported under a name derived from the file name and
    the file's content hash; loading the same file twice is a no-op. This is the only way
    pyrovae runs code from a file outside the Python environment: never from a run folder.
    """
    import importlib.util
    import sys

    p = Path(path).expanduser().resolve()
    if p in _LOADED_FILES:
        return _LOADED_FILES[p]
    if not p.is_file() or p.suffix != ".py":
        raise ConfigError(f"--plugin {path}: expected an existing Python file (.py)")
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    stem = re.sub(r"\W", "_", p.stem)
    name = f"pyrovae_plugin_{stem}_{digest[:12]}"
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--plugin {path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except ConfigError as e:
        del sys.modules[name]
        raise ConfigError(f"--plugin {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - the user's file failed: say where, in one line
        del sys.modules[name]
        raise ConfigError(
            f"--plugin {path}: importing it raised {type(e).__name__}: {_first_line(e)}"
        ) from None
    _LOADED_FILES[p] = module
    return module
