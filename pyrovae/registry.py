"""A tiny registry: `kind` string -> small class with a validated `Spec`.

Priors, likelihoods, networks and guides are each a registry of classes. Every class carries a
pydantic `Spec` whose `kind` field is a `Literal`; the config schema is the discriminated
union of the registered specs, so adding a prior is one class in `priors.py` (and its test).
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class Spec(BaseModel):
    """Base of every building block's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Registry(Generic[T]):
    """Maps `kind` to a class that has a `Spec` (pydantic model with a `kind` literal)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        kind = cls.Spec.model_fields["kind"].default  # type: ignore[attr-defined]
        if kind in self._classes:
            raise RuntimeError(f"{self.what} kind {kind!r} registered twice")
        self._classes[kind] = cls
        return cls

    def kinds(self) -> list[str]:
        return list(self._classes)

    def __getitem__(self, kind: str) -> type[T]:
        return self._classes[kind]

    def spec_type(self) -> Any:
        """The pydantic type accepting any registered spec, chosen by its `kind` field."""
        specs = tuple(c.Spec for c in self._classes.values())  # type: ignore[attr-defined]
        if len(specs) == 1:
            return specs[0]
        return Annotated[Union[specs], Field(discriminator="kind")]  # noqa: UP007

    def build(self, spec: Spec, *args: Any, **kwargs: Any) -> T:
        return self._classes[spec.kind](spec, *args, **kwargs)  # type: ignore[attr-defined]
