"""The run configuration: `[data]`, `[model]`, `[train]` — validated on load.

A config is data (TOML or a dict), never code. Unknown keys and kinds are rejected with the
dotted name of the key and the allowed values; every value can be overridden with
`--set section.key=value` (the value is parsed as TOML, e.g. `train.epochs=5`,
`model.prior={kind="mixture", components=10}`).
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from pyrovae.data import DataConfig
from pyrovae.errors import ConfigError
from pyrovae.guides import GUIDES
from pyrovae.likelihoods import LIKELIHOODS
from pyrovae.model import MODELS
from pyrovae.networks import MLP, NETWORKS
from pyrovae.priors import PRIORS
from pyrovae.structured import STRUCTURED

NetworkSpec = NETWORKS.spec_type()
PriorSpec = PRIORS.spec_type()
LikelihoodSpec = LIKELIHOODS.spec_type()
GuideSpec = GUIDES.spec_type()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    """`[model]`: what p(x|z)p(z) and q(z|x) are (or the deterministic autoencoder)."""

    #: `vae`, `ae`, or a whole Pyro model of the user's: `"package.module:ClassName"` or the
    #: short name of a registered model plugin (its options in `[model.options]`)
    kind: str = "vae"
    #: a plugin model's options, validated by its `Spec` (built-in kinds take none)
    options: Optional[dict[str, Any]] = None  # noqa: UP045
    latent_dim: int = Field(2, ge=1)
    encoder: NetworkSpec = MLP.Spec(hidden=[256, 128])
    decoder: NetworkSpec = MLP.Spec(hidden=[128, 256])
    prior: PriorSpec = PRIORS["normal"].Spec()
    likelihood: LikelihoodSpec = LIKELIHOODS["continuous_bernoulli"].Spec()
    guide: GuideSpec = GUIDES["normal"].Spec()
    #: autoencoder only: deep | linear (no hidden layers) | overcomplete (latent_dim > D) | denoising
    variant: Literal["deep", "linear", "overcomplete", "denoising"] = "deep"
    #: autoencoder `denoising` variant: std of the Gaussian noise added to inputs while training
    noise: float = Field(0.3, ge=0)
    #: structured models `m2`, `cvae` (condition "label"): number of classes (default 10)
    classes: Optional[int] = Field(None, ge=2)  # noqa: UP045
    #: `m2`: weight α of the classifier term α·E[-log q(y|x)] on labelled points (Kingma et
    #: al. 2014; default 46, the Pyro SS-VAE example's)
    alpha: Optional[float] = Field(None, ge=0)  # noqa: UP045
    #: `cvae`: what the model is conditioned on: "label" (the class, one-hot) or "quadrants"
    #: (the observed quadrants of an image; the rest is generated)
    condition: Optional[Literal["label", "quadrants"]] = None  # noqa: UP045
    #: `cvae` with condition "quadrants": numbers of given quadrants trained on, each point
    #: drawing one of them per step (default [1, 2, 3]; the Pyro CVAE example's tasks)
    given: Optional[list[Literal[1, 2, 3]]] = None  # noqa: UP045
    #: `cvae` with condition "quadrants": a trained `cvae_baseline` run folder whose network,
    #: frozen, fills the hidden pixels of the prior net's input with its prediction (Pyro's
    #: CVAE example); its weights are copied into the new run, which then stands alone
    baseline_run: Optional[str] = None  # noqa: UP045
    #: `cvae` with condition "quadrants": whether p(x_missing | z, x_g) also reads the given
    #: pixels (default true); false: the decoder reads z alone, as the generation net of Pyro's
    #: CVAE example, and the given pixels reach the missing ones only through p(z | x_g)
    decoder_reads_condition: Optional[bool] = None  # noqa: UP045
    #: `gmvae` only: number of mixture components K of p(z|c) (default 10)
    clusters: Optional[int] = Field(None, ge=2)  # noqa: UP045
    #: `gmvae` only: q(c|x) q(z|x,c) ("conditional", default), q(c|x) q(z|x) ("mean_field"),
    #: or q(z|x) q(c|z) with q(c|z) = p(c|z) ("posterior", VaDE's)
    cluster_guide: Optional[Literal["conditional", "mean_field", "posterior"]] = None  # noqa: UP045
    #: `gmvae` with cluster_guide "posterior": a trained VAE run folder (same latent_dim,
    #: encoder, decoder, likelihood) whose networks start the new run, with p(z|c) fitted to its
    #: codes (VaDE's pretraining; `pyrovae.structured.gmvae.GMVAE.before_training`)
    init_from: Optional[str] = None  # noqa: UP045
    #: `hvae` only: sizes of the stochastic layers z_1 (next to x) ... z_L (top), L >= 2
    latent_dims: Optional[list[Annotated[int, Field(ge=1)]]] = None  # noqa: UP045
    #: `hvae` only: hidden sizes of the MLPs of p(z_l | z_{l+1}) and q(z_{l+1} | z_l)
    layer_hidden: Optional[list[Annotated[int, Field(ge=1)]]] = None  # noqa: UP045

    @model_validator(mode="after")
    def _fields_of_kind(self) -> ModelConfig:
        for name, kinds in KIND_FIELDS.items():
            if getattr(self, name) is not None and self.kind not in kinds:
                raise ValueError(
                    f"model.{name} applies to model.kind = {' | '.join(map(repr, kinds))}; "
                    f"got model.kind = {self.kind!r}"
                )
        if self.given is not None and self.condition != "quadrants":
            raise ValueError('model.given applies to model.condition = "quadrants"')
        if self.given is not None and not self.given:
            raise ValueError("model.given: expected a non-empty list of 1, 2, 3")
        if self.baseline_run is not None and self.condition != "quadrants":
            raise ValueError('model.baseline_run applies to model.condition = "quadrants"')
        if self.init_from is not None and self.cluster_guide != "posterior":
            raise ValueError(
                'model.init_from applies to model.cluster_guide = "posterior" (whose q(z|x) has '
                f"the shape of a VAE's); got model.cluster_guide = {self.cluster_guide!r}"
            )
        if self.decoder_reads_condition is not None and self.condition != "quadrants":
            raise ValueError(
                'model.decoder_reads_condition applies to model.condition = "quadrants" (a label '
                "CVAE's prior p(z) does not read the label, so its decoder must)"
            )
        return self

    @model_validator(mode="after")
    def _gmvae_hvae_fields(self) -> ModelConfig:
        """What a `gmvae` or an `hvae` does not take, and the hvae's layers."""
        unused = {
            "gmvae": {
                "prior": "p(z|c) is the model's own mixture",
                "guide": "q(c|x) q(z|x,c) is the model's own",
            },
            "hvae": {"latent_dim": "use model.latent_dims"},
        }.get(self.kind, {})
        for name, why in unused.items():
            # compared with the default, not `model_fields_set`: a saved config.toml holds
            # every field, and must load again
            if getattr(self, name) != ModelConfig.model_fields[name].default:
                raise ValueError(
                    f"model.{name} does not apply to kind = {self.kind!r} ({why}); remove it"
                )
        if self.kind == "hvae":
            if self.latent_dims is None or len(self.latent_dims) < 2:
                raise ValueError(
                    "model.latent_dims: kind = 'hvae' needs at least 2 stochastic layers, "
                    f"e.g. [64, 32]; got {self.latent_dims!r}"
                )
            if self.prior.kind == "vamp":
                raise ValueError(
                    "model.prior: kind = 'vamp' needs q(z|x) of the top layer in closed form, "
                    "which an hvae does not have; use normal, normal_learned, mixture or flow"
                )
        return self

    @model_validator(mode="before")
    @classmethod
    def _options_of_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("kind"), str):
            kind, options = data["kind"], data.get("options")
            if kind in MODELS and (options is None or isinstance(options, dict)):
                data = {**data, "options": {**(options or {}), "kind": kind}}
            elif (kind in ("vae", "ae") or kind in STRUCTURED) and options:
                raise ValueError(
                    f"model.options applies to a plugin model; model.kind = {kind!r} takes its "
                    "options from the other [model] keys"
                )
        return data

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in ("vae", "ae") and kind not in STRUCTURED and kind not in MODELS:
            known = "".join(f", {k!r}" for k in [*STRUCTURED, *MODELS.kinds()])
            raise ValueError(
                f"expected 'vae', 'ae'{known} or a model plugin 'package.module:ClassName'"
            )
        return kind


#: `[model]` keys that only some structured kinds take: key -> kinds
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "classes": ("m2", "cvae"),
    "alpha": ("m2",),
    "condition": ("cvae", "cvae_baseline"),
    # the baseline has no z and ignores it, so one config file serves the CVAE and its baseline
    "decoder_reads_condition": ("cvae", "cvae_baseline"),
    "given": ("cvae", "cvae_baseline"),
    "baseline_run": ("cvae",),
    "clusters": ("gmvae",),
    "cluster_guide": ("gmvae",),
    "init_from": ("gmvae",),
    "latent_dims": ("hvae",),
    "layer_hidden": ("hvae",),
}


class TrainConfig(_Section):
    """`[train]`: the objective and the optimizer loop."""

    objective: Literal["trace_elbo", "mean_field", "trace_enum", "iwae"] = "trace_elbo"
    num_particles: int = Field(1, ge=1)
    beta: float = Field(1.0, ge=0)
    kl_warmup_epochs: int = Field(0, ge=0)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    #: semi-supervised models (`m2`, with `data.labels`): every minibatch holds this many
    #: labelled points (drawn cyclically) beside `batch_size - k` unlabelled ones, each group
    #: scaled to its size so the loss stays unbiased (`pyrovae.train.LabelledBatches`);
    #: 0 (default): plain random minibatches over all training points
    labelled_per_batch: int = Field(0, ge=0)
    #: semi-supervised models: the labelled points in minibatches of their own, spread over each
    #: epoch between the unlabelled ones (Pyro's SS-VAE example), every point weighted so the
    #: epoch's mean loss is the full-data objective (`pyrovae.train.SeparateLabelledBatches`)
    labelled_batches: bool = False
    #: learning-rate schedule, a function of the epoch e = 0, 1, ... only (so resuming and
    #: chunked training see the same rates): lr_e = max(lr_min, lr * lr_decay**e), i.e.
    #: `torch.optim.lr_scheduler.ExponentialLR(gamma=lr_decay)` with a floor. 1.0: constant
    lr_decay: float = Field(1.0, gt=0, le=1)
    lr_min: float = Field(0.0, ge=0)
    seed: int = Field(0, ge=0, le=2**32 - 1)  # pyro.set_rng_seed's range
    #: Pyro's validation (site structure, distribution arguments, supports) on every step; by
    #: default it runs on the first step of each epoch and a bad value later shows up as a
    #: non-finite loss, which the trainer catches and rolls back (docs: benchmarks, validation)
    validate_every_step: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: non-finite loss: restore the last good state and retry with lr * lr_backoff, at most this often
    max_retries: int = Field(3, ge=0)
    lr_backoff: float = Field(0.5, gt=0, lt=1)
    #: TensorBoard logs under RUN/tb/ (`pyrovae.tblog`): scalars every `log_every` optimizer
    #: steps and every epoch (ELBO and its parts, KL per dimension, lr, beta), images per epoch
    log: bool = True
    log_every: int = Field(50, ge=1)
    #: record the training step once as a CUDA graph and replay it (CUDA only; docs: Scaling out)
    cuda_graph: bool = False

    @model_validator(mode="after")
    def _lr_floor(self) -> TrainConfig:
        if self.lr_min > self.lr:
            raise ValueError(
                f"lr_min ({self.lr_min:g}) must not exceed lr ({self.lr:g}): the schedule only "
                "lowers the learning rate"
            )
        if self.labelled_per_batch >= self.batch_size:
            raise ValueError(
                f"labelled_per_batch ({self.labelled_per_batch}) must be smaller than batch_size "
                f"({self.batch_size}): a minibatch holds both labelled and unlabelled points"
            )
        if self.labelled_batches and self.labelled_per_batch:
            raise ValueError(
                f"labelled_batches = true puts the labelled points in minibatches of their own; "
                f"labelled_per_batch = {self.labelled_per_batch} mixes them in: set one of them"
            )
        return self


class Config(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.model.kind == "ae" and self.train.objective != "trace_elbo":
            pass  # the AE ignores the objective; allowed so one config can drive `compare`
        if self.model.kind == "m2" and self.train.objective not in ("trace_enum", "trace_elbo"):
            raise ValueError(
                'train.objective: model.kind = "m2" trains with "trace_enum" (y summed out) or '
                f'"trace_elbo" (y sampled, score-function gradient); got {self.train.objective!r}'
            )
        if self.train.labelled_per_batch and self.model.kind != "m2":
            raise ValueError(
                "train.labelled_per_batch: applies to semi-supervised models (model.kind = "
                f'"m2", with data.labels); got model.kind = {self.model.kind!r}'
            )
        if self.train.labelled_batches and self.model.kind != "m2":
            raise ValueError(
                "train.labelled_batches: applies to semi-supervised models (model.kind = "
                f'"m2", with data.labels); got model.kind = {self.model.kind!r}'
            )
        needs = {"gmvae": ("trace_enum",), "hvae": ("trace_elbo", "trace_enum", "iwae")}
        allowed = needs.get(self.model.kind)
        if allowed and self.train.objective not in allowed:
            why = {
                "gmvae": "its cluster c is summed out exactly by enumeration",
                "hvae": "a layer's KL given the sampled layer above has no closed form",
            }[self.model.kind]
            raise ValueError(
                f"train.objective: kind = {self.model.kind!r} needs "
                f"{' or '.join(repr(a) for a in allowed)} ({why}); got {self.train.objective!r}"
            )
        return self

    def __eq__(self, other: object) -> bool:
        """Equal values, whatever schema class validated them (plugins extend the schema)."""
        if not isinstance(other, Config):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_toml(self) -> str:
        """The resolved config as TOML text (what a run folder's `config.toml` holds)."""
        return tomli_w.dumps(self.to_dict())


_BLOCKS = ("prior", "likelihood", "encoder", "decoder", "guide", "options")


def _clean_loc(loc: tuple) -> tuple:
    """Drop the union tag pydantic inserts (`model.prior.mixture.components` -> `model.prior.components`)."""
    out: list = []
    for part in loc:
        if (
            out
            and out[-1] in _BLOCKS
            and any(part in r.kinds() for r in (PRIORS, LIKELIHOODS, NETWORKS, GUIDES))
        ):
            out.append(f"<{part}>")
            continue
        out.append(part)
    return tuple(out)


def _format_validation_error(err: ValidationError, source: str, root: type) -> str:
    lines = []
    for e in err.errors():
        loc = _clean_loc(e["loc"])
        name = ".".join(str(p) for p in loc if not str(p).startswith("<"))
        msg = e["msg"]
        if e["type"] == "union_tag_not_found" and loc and loc[-1] in _REG_BY_BLOCK:
            kinds = [k for r in _REG_BY_BLOCK[loc[-1]] for k in r.kinds()]
            msg = f"missing 'kind' (allowed: {', '.join(kinds)})"
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            allowed = _allowed_keys(loc[:-1], root)
            if allowed:
                msg += f" (allowed: {', '.join(allowed)})"
        got = e.get("input")
        got_s = "" if e["type"] == "missing" or isinstance(got, dict) else f"; got {got!r}"
        lines.append(f"{name or '<top level>'}: {msg}{got_s}")
    return f"invalid config ({source}):\n  " + "\n  ".join(lines)


def _allowed_keys(path: tuple, root: type) -> list[str]:
    model: Any = root
    prev: Any = None
    for part in path:
        if isinstance(part, str) and part.startswith("<"):
            kind = part[1:-1]
            model = next((r.spec(kind) for r in _REG_BY_BLOCK[prev] if kind in r.kinds()), None)
        elif (
            isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields
        ):
            ann = model.model_fields[part].annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        else:
            return []
        prev = part
        if model is None and not (isinstance(prev, str) and prev in _BLOCKS):
            return []
    return list(model.model_fields) if isinstance(model, type) else []


_REG_BY_BLOCK = {
    "prior": (PRIORS,),
    "likelihood": (LIKELIHOODS,),
    "encoder": (NETWORKS,),
    "decoder": (NETWORKS,),
    "guide": (GUIDES,),
    "options": (MODELS,),
}

#: the blocks of `[model]` whose `kind` may name a plugin, and their registries
_PLUGGABLE = {
    "prior": PRIORS,
    "likelihood": LIKELIHOODS,
    "encoder": NETWORKS,
    "decoder": NETWORKS,
    "guide": GUIDES,
}
_SCHEMAS: dict[tuple[int, ...], type[Config]] = {}


def config_class() -> type[Config]:
    """`Config` with every registered building block, plugins included (a subclass of
    `Config`, rebuilt when a registry gains a class)."""
    key = tuple(r.version for r in (PRIORS, LIKELIHOODS, NETWORKS, GUIDES, MODELS))
    if key not in _SCHEMAS:
        base = ModelConfig.model_fields
        fields: dict[str, Any] = {
            name: (reg.spec_type(), base[name].default) for name, reg in _PLUGGABLE.items()
        }
        if MODELS.kinds():
            fields["options"] = (Optional[MODELS.spec_type()], None)  # noqa: UP045
        model = create_model("ModelConfig", __base__=ModelConfig, **fields)
        _SCHEMAS[key] = create_model("Config", __base__=Config, model=(model, model()))
    return _SCHEMAS[key]


def resolve_plugins(raw: dict[str, Any]) -> None:
    """Import the plugins a raw config names (`kind = "package.module:ClassName"` or an
    entry-point name) so that validation knows them; `ConfigError` naming the key if one
    cannot be imported or is not a valid plugin."""
    model = raw.get("model")
    if not isinstance(model, dict):
        return
    for block, registry in _PLUGGABLE.items():
        entry = model.get(block)
        if isinstance(entry, dict) and isinstance(entry.get("kind"), str):
            registry.resolve(entry["kind"], f"model.{block}.kind")
    kind = model.get("kind")
    if isinstance(kind, str) and kind not in ("vae", "ae") and kind not in STRUCTURED:
        MODELS.resolve(kind, "model.kind")


def plugins_used(cfg: Config) -> list[dict[str, Any]]:
    """The plugins a validated config uses: key, kind, where it came from, source SHA-256."""
    out = []
    entries = [(f"model.{b}", getattr(cfg.model, b).kind, r) for b, r in _PLUGGABLE.items()]
    entries.append(("model", cfg.model.kind, MODELS))
    for key, kind, registry in entries:
        if kind in registry.origin:
            out.append({"key": key, "kind": kind, **registry.origin[kind]})
    return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. train.epochs=5); got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set: bad key {key!r} in {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as model.prior.kind=mixture
    except RecursionError:
        raise ConfigError(
            f"--set {key}: the value is nested too deeply to be a config value"
        ) from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to a raw (unvalidated) config dict."""
    raw = _deepcopy(raw)
    for item in overrides:
        path, value = _parse_override(item)
        node = raw
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"--set {item}: {part!r} is a value, not a table")
            node = nxt
        node[path[-1]] = value
    return raw


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not a config: arrays or tables nested too deeply") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None


def load_config(
    source: str | Path | dict[str, Any] | Config | None = None, overrides: list[str] | None = None
) -> Config:
    """Load and validate a config from a TOML path, a dict, or defaults (`None`).

    Raises `ConfigError` naming each bad key (dotted) and the problem.
    """
    if isinstance(source, Config):
        raw = source.to_dict()
        name = "config object"
    elif source is None:
        raw, name = {}, "defaults"
    elif isinstance(source, dict):
        raw, name = source, "dict"
    else:
        raw, name = read_toml(source), str(source)
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{name}: a config must be a table of [data], [model], [train]; got {type(raw).__name__}"
        )
    raw = apply_overrides(raw, list(overrides or []))
    raw = _drop_retired_keys(raw, name)
    try:
        resolve_plugins(raw)
    except ConfigError as e:
        raise ConfigError(f"invalid config ({name}):\n  {e}") from None
    schema = config_class()
    try:
        cfg = schema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, name, schema)) from None
    bad = [
        (k, v) for k, v in _leaves(cfg.to_dict()) if isinstance(v, float) and not math.isfinite(v)
    ]
    if bad:
        lines = "\n  ".join(f"{k}: expected a finite number; got {v!r}" for k, v in bad)
        raise ConfigError(f"invalid config ({name}):\n  {lines}")
    return cfg


#: keys earlier versions wrote into run folders and no longer have a meaning: dropped on load
#: (with a warning where they asked for something that no longer exists)
_RETIRED = {("train", "fast_path"): "every training step runs the Pyro program"}


def _drop_retired_keys(raw: dict[str, Any], name: str) -> dict[str, Any]:
    import warnings

    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for (section, key), why in _RETIRED.items():
        table = out.get(section)
        if isinstance(table, dict) and key in table:
            if table.pop(key):
                warnings.warn(
                    f"{name}: {section}.{key} is no longer an option ({why}); ignored",
                    stacklevel=3,
                )
    return out


def _leaves(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """`(dotted.key, value)` for every non-table value of a nested dict (lists flattened)."""
    if isinstance(d, dict):
        return [kv for k, v in d.items() for kv in _leaves(v, f"{prefix}{k}.")]
    if isinstance(d, list):
        return [kv for i, v in enumerate(d) for kv in _leaves(v, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), d)]
