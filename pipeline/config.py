"""The pipeline file: stages, their configs, and references between them.

```yaml
name: demo
store: runs                      # local folder or s3://bucket/prefix; a run writes below it
stages:
  bootstrap: {config: {}}
  data:
    config:
      tokenizer: ${bootstrap.output}/model
      sources: [{name: daily, format: alpaca, uri: "${bootstrap.output}/data/sft_daily.jsonl"}]
  sft:
    config: {model: "${bootstrap.output}/model", data: "${data.output}"}
```

``${NAME.output}`` is the output URI of stage NAME in this run
(``<store>/<run id>/<NAME>``); references order the stages. Errors name the
pipeline file and the YAML path of the bad field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from jobs import store
from jobs.config_file import describe_validation_error, load_mapping, validate
from jobs.contract import StageConfig
from jobs.errors import BadInputError
from jobs.stages import STAGES, one_process_only, stage_module

REFERENCE = re.compile(r"\$\{([A-Za-z0-9_-]+)\.output\}")


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str | None = Field(None, description="the stage type; defaults to the entry's name")
    config: dict[str, Any] = {}
    nproc_per_node: int = Field(1, ge=1, description="processes per node (torchrun when > 1)")
    nnodes: int = Field(1, ge=1, description="nodes (Kubernetes backend)")
    retries: int = Field(2, ge=0, description="re-launches on a retryable exit (preemption)")
    values: dict[str, Any] = Field(
        default_factory=dict, description="chart values for this stage (gpus, resources, ...)"
    )


class KubernetesSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    namespace: str = "default"
    values: dict[str, Any] = Field(
        default_factory=dict, description="chart values for every stage (image, s3, scheduling)"
    )
    stall_timeout_s: float = Field(
        900, gt=0, description="fail a stage none of whose pods has run in this long"
    )


# A run id or stage name: part of every output's path and of its Job's name, so a DNS label
# (no path separator, no '..'), short enough for <run>-<stage> to make a Job name.
NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
Name = Annotated[str, StringConstraints(pattern=NAME, max_length=40)]


class PipelineFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    store: str = "runs"
    run_id: Name | None = None
    stages: dict[Name, StageSpec] = Field(min_length=1)
    kubernetes: KubernetesSettings = KubernetesSettings()


@dataclass
class PlannedStage:
    """One stage of a run, resolved: what runs, with which config, after what."""

    name: str
    stage: str
    config: StageConfig
    spec: StageSpec
    needs: list[str]

    @property
    def output(self) -> str:
        return self.config.output


@dataclass
class Plan:
    name: str
    run_id: str
    run_uri: str
    stages: list[PlannedStage]  # in an order that respects every reference
    kubernetes: KubernetesSettings
    source: str  # the pipeline file, for error messages

    def config_uri(self, stage: PlannedStage) -> str:
        """Where the resolved config of ``stage`` is kept: by hash, so nothing is overwritten."""
        return store.join(
            self.run_uri, "_configs", f"{stage.name}-{stage.config.config_hash()[:12]}.json"
        )

    def describe(self) -> dict:
        """What ``rlhf status`` needs to know about the run, kept at ``<run>/run.json``."""
        return {
            "name": self.name,
            "run_id": self.run_id,
            "run_uri": self.run_uri,
            "stages": [
                {"name": s.name, "stage": s.stage, "output": s.output, "needs": s.needs}
                for s in self.stages
            ],
        }


def _substitute(value: Any, outputs: dict[str, str], where: str, found: set[str]) -> Any:
    if isinstance(value, str):

        def replace(match: re.Match) -> str:
            name = match.group(1)
            if name not in outputs:
                raise BadInputError(f"{where}: ${{{name}.output}} names no stage of this pipeline")
            found.add(name)
            return outputs[name]

        return REFERENCE.sub(replace, value)
    if isinstance(value, dict):
        return {k: _substitute(v, outputs, f"{where}.{k}", found) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, outputs, f"{where}[{i}]", found) for i, v in enumerate(value)]
    return value


def _order(needs: dict[str, list[str]], source: str) -> list[str]:
    """Stages in declaration order, each after the stages it references."""
    done: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, chain: list[str]) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = " -> ".join([*chain, name])
            raise BadInputError(f"{source}: stages: the references form a cycle: {cycle}")
        visiting.add(name)
        for dep in needs[name]:
            visit(dep, [*chain, name])
        visiting.discard(name)
        done.append(name)

    for name in needs:
        visit(name, [])
    return done


def plan(path: str, run_id: str | None = None, store_uri: str | None = None) -> Plan:
    """Read, validate and resolve a pipeline file into the stages of one run."""
    raw = load_mapping(path)
    try:
        pipeline = PipelineFile.model_validate(raw)
    except ValidationError as exc:
        raise BadInputError(describe_validation_error(exc, path)) from None
    if run_id is not None and not (re.fullmatch(NAME, run_id) and len(run_id) <= 40):
        raise BadInputError(
            f"--run-id {run_id!r}: a run id is lowercase letters, digits and '-' (a DNS "
            "label), at most 40 characters"
        )
    run_id = run_id or pipeline.run_id or pipeline.name
    root = store_uri or pipeline.store
    if re.match(r"[A-Za-z][\w+.-]*:/", root) and not root.startswith(("s3://", "file://")):
        # "s3:/bucket" or "S3://bucket" would otherwise be a local folder named "s3:"
        raise BadInputError(
            f"{path}: store: {root!r} is neither s3://bucket/prefix nor a local folder"
        )
    if not store.is_s3(root):
        root = str(Path(store.local_path(root)).resolve())
    run_uri = store.join(root, run_id)
    outputs = {name: store.join(run_uri, name) for name in pipeline.stages}

    resolved: dict[str, tuple[str, dict, list[str]]] = {}
    for name, spec in pipeline.stages.items():
        stage = spec.stage or name
        if stage not in STAGES:
            raise BadInputError(
                f"{path}: stages.{name}.stage: unknown stage {stage!r}; the stages "
                f"are: {', '.join(STAGES)}"
            )
        if "output" in spec.config:
            raise BadInputError(
                f"{path}: stages.{name}.config.output: set by the run ({outputs[name]}); remove it"
            )
        found: set[str] = set()
        config = _substitute(spec.config, outputs, f"{path}: stages.{name}.config", found)
        resolved[name] = (stage, {**config, "output": outputs[name]}, sorted(found))

    # the charts cut a Job's name, <run>-<stage name>, to 52 characters (its pods' names
    # take the rest of 63): two stages must not be cut to one Job
    jobs: dict[str, str] = {}
    for name in resolved:
        job = f"{run_id}-{name}"[:52].rstrip("-")
        if job in jobs:
            raise BadInputError(
                f"{path}: stages.{name}: its Job name {job!r} (the run id and the stage name, "
                f"cut to 52 characters) is stage {jobs[job]!r}'s too; shorten the run id or "
                "a stage name"
            )
        jobs[job] = name
    order = _order({name: needs for name, (_, _, needs) in resolved.items()}, path)
    stages = []
    for name in order:
        stage, config, needs = resolved[name]
        spec = pipeline.stages[name]
        if why := one_process_only(stage, spec.nproc_per_node * spec.nnodes):
            raise BadInputError(f"{path}: stages.{name}: {why}")
        model = stage_module(stage).Config
        typed = validate(model, config, path, prefix=f"stages.{name}.config")
        stages.append(PlannedStage(name=name, stage=stage, config=typed, spec=spec, needs=needs))
    return Plan(
        name=pipeline.name,
        run_id=run_id,
        run_uri=run_uri,
        stages=stages,
        kubernetes=pipeline.kubernetes,
        source=path,
    )
