"""The pipeline file: validation with YAML paths, references, ordering."""

from __future__ import annotations

import pytest
import yaml

from jobs.errors import BadInputError
from pipeline.config import plan


def write(tmp_path, pipeline: dict) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return str(path)


def demo(**sft_config):
    return {
        "name": "t",
        "store": "runs",
        "stages": {
            "sft": {
                "config": {
                    "model": "${bootstrap.output}/model",
                    "data": "${data.output}",
                    **sft_config,
                }
            },
            "data": {
                "config": {
                    "sources": [
                        {
                            "name": "d",
                            "format": "alpaca",
                            "uri": "${bootstrap.output}/data/sft_daily.jsonl",
                        }
                    ]
                }
            },
            "bootstrap": {},
        },
    }


def test_references_order_the_stages_and_resolve_to_run_outputs(tmp_path):
    the_plan = plan(write(tmp_path, demo()), store_uri=str(tmp_path / "s"))
    assert [s.name for s in the_plan.stages] == ["bootstrap", "data", "sft"]
    sft = the_plan.stages[2]
    assert sft.needs == ["bootstrap", "data"]
    assert sft.config.model == f"{tmp_path}/s/t/bootstrap/model"
    assert sft.config.data == f"{tmp_path}/s/t/data"
    assert sft.output == f"{tmp_path}/s/t/sft"


def test_run_id_and_s3_store(tmp_path):
    the_plan = plan(write(tmp_path, demo()), run_id="exp-7", store_uri="s3://bucket/team")
    assert the_plan.run_uri == "s3://bucket/team/exp-7"
    assert the_plan.stages[0].output == "s3://bucket/team/exp-7/bootstrap"


def test_a_bad_field_is_named_by_its_yaml_path(tmp_path):
    path = write(tmp_path, demo(train={"learning_rate": -1}))
    with pytest.raises(
        BadInputError,
        match=r"pipeline.yaml: stages.sft.config.train.learning_rate: Input should be",
    ):
        plan(path)


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(
        BadInputError, match=r"pipeline.yaml: stagse: Extra inputs are not permitted"
    ):
        plan(write(tmp_path, {"name": "t", "stagse": {}, "stages": {"bootstrap": {}}}))


def test_unknown_stage_type(tmp_path):
    with pytest.raises(BadInputError, match=r"stages.x.stage: unknown stage 'ppx'"):
        plan(write(tmp_path, {"name": "t", "stages": {"x": {"stage": "ppx"}}}))


def test_reference_to_a_missing_stage(tmp_path):
    pipeline = demo()
    del pipeline["stages"]["data"]
    with pytest.raises(
        BadInputError, match=r"stages.sft.config.data: \$\{data.output\} names no stage"
    ):
        plan(write(tmp_path, pipeline))


def test_cycles_are_refused(tmp_path):
    pipeline = {
        "name": "t",
        "stages": {
            "a": {
                "stage": "data",
                "config": {
                    "sources": [{"name": "x", "format": "alpaca", "uri": "${b.output}/f.jsonl"}]
                },
            },
            "b": {
                "stage": "data",
                "config": {
                    "sources": [{"name": "x", "format": "alpaca", "uri": "${a.output}/f.jsonl"}]
                },
            },
        },
    }
    with pytest.raises(BadInputError, match="the references form a cycle: a -> b -> a"):
        plan(write(tmp_path, pipeline))


def test_output_is_set_by_the_run(tmp_path):
    with pytest.raises(BadInputError, match="stages.bootstrap.config.output: set by the run"):
        plan(write(tmp_path, {"name": "t", "stages": {"bootstrap": {"config": {"output": "/x"}}}}))


def test_invalid_yaml(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: t\nstages: {bootstrap: {}\n")
    with pytest.raises(BadInputError, match=r"p.yaml: line \d+: not valid YAML"):
        plan(str(path))


@pytest.mark.parametrize("run_id", ["../other-team", "a/b", "Exp_1", "x" * 41])
def test_a_run_id_from_the_command_line_is_a_dns_label(run_id, tmp_path):
    with pytest.raises(BadInputError, match="--run-id"):
        plan(write(tmp_path, demo()), run_id=run_id)


@pytest.mark.parametrize("name", ["../sft", "sft/x", "SFT", "sft_2"])
def test_a_stage_name_is_a_dns_label(name, tmp_path):
    pipeline = {"name": "t", "stages": {name: {"stage": "bootstrap"}}}
    with pytest.raises(BadInputError, match="stages"):
        plan(write(tmp_path, pipeline))


def test_a_config_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "p.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"name": "t", "stages": {"bootstrap": {}}}')
    assert [s.name for s in plan(str(path)).stages] == ["bootstrap"]


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    """PyYAML keeps the last of two equal keys without a word: a second stage of one name
    would replace the first one and its config."""
    path = tmp_path / "p.yaml"
    path.write_text(
        "name: t\nstages:\n  bootstrap:\n    config: {daily_per_lang: 123}\n"
        "  bootstrap:\n    config: {hate_per_lang: 7}\n"
    )
    with pytest.raises(BadInputError, match=r"p.yaml: line 5: .*key 'bootstrap' given twice"):
        plan(str(path))
    # a block shared by an anchor, one key of it overridden, is no key given twice
    path.write_text(
        "name: t\nshared: &small {daily_per_lang: 30, hate_per_lang: 10}\nstages:\n"
        "  bootstrap:\n    config: {<<: *small, hate_per_lang: 20}\n"
    )
    from jobs.config_file import load_mapping

    config = load_mapping(str(path))["stages"]["bootstrap"]["config"]
    assert config == {"daily_per_lang": 30, "hate_per_lang": 20}
    path = tmp_path / "p.json"
    path.write_text('{"name": "t", "name": "u", "stages": {"bootstrap": {}}}')
    with pytest.raises(BadInputError, match=r"p.json: not valid YAML/JSON \(key 'name' given"):
        plan(str(path))


@pytest.mark.parametrize("root", ["s3:/bucket/runs", "S3://bucket/runs", "gs://bucket/runs"])
def test_a_store_that_is_no_s3_uri_nor_folder_is_refused(tmp_path, root):
    pipeline = {"name": "t", "store": root, "stages": {"bootstrap": {}}}
    with pytest.raises(BadInputError, match=r"store: .* is neither s3://bucket/prefix nor"):
        plan(write(tmp_path, pipeline))


def test_the_command_line_refuses_what_a_run_would_meet_only_later(tmp_path, capsys, monkeypatch):
    """`rlhf validate` checks every stage's chart values; `rlhf run --only` a stage the
    file has; a kubeconfig that cannot be used is one line, not a traceback."""
    from pipeline.cli import main

    pipeline = demo()
    pipeline["stages"]["sft"]["values"] = {"gpu": 1}  # gpus
    assert main(["validate", write(tmp_path, pipeline)]) == 65
    assert "stages.sft.values (with kubernetes.values).gpu: Extra inputs" in (
        capsys.readouterr().err
    )
    path = write(tmp_path, demo())
    store = str(tmp_path / "runs")
    assert main(["run", path, "--store", store, "--only", "bootstap"]) == 65
    assert "--only bootstap: no such stage in" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing was written

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    code = main(["run", path, "--store", store, "--backend", "kubernetes"])
    err = capsys.readouterr().err
    assert code == 65 and "error: kubernetes: cannot use the current context" in err, err
    assert "Traceback" not in err


def test_two_stage_names_cut_to_one_job_name_are_refused(tmp_path):
    pipeline = {
        "name": "t",
        "stages": {
            "reward-model-first": {"stage": "bootstrap"},
            "reward-model-second": {"stage": "bootstrap"},
        },
    }
    plan(write(tmp_path, pipeline))  # the control: a short run id, two Job names
    with pytest.raises(BadInputError, match="stages.reward-model-second: its Job name 'a+-rew"):
        plan(write(tmp_path, pipeline), run_id="a" * 40)


def test_a_one_process_stage_under_several_processes_is_refused(tmp_path):
    """data (like bootstrap, generate, label, evaluate and merge) shards nothing: each
    rank would do all the work and write the same files."""
    pipeline = demo()
    pipeline["stages"]["sft"]["nproc_per_node"] = 2  # the control: sft shards its data
    plan(write(tmp_path, pipeline))
    pipeline["stages"]["data"]["nnodes"] = 2
    with pytest.raises(BadInputError, match=r"stages\.data: the data stage runs as one process"):
        plan(write(tmp_path, pipeline))
