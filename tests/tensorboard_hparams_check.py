#!/usr/bin/env python3
"""Read the HParams summaries of `kiln tune --logdir` with TensorBoard's own code.

Usage: python3 tests/tensorboard_hparams_check.py LOGDIR STUDY_JSON METRIC_TAG PARAM...

STUDY_JSON is the output of `kiln study --json`, and PARAM the names of the
model's search parameters. Exits non-zero, with a message, when the
experiment, a trial's session or its metric scalars are missing or do not
match the study.
"""

import json
import math
import os
import sys

from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import (
    api_pb2,
    backend_context,
    get_experiment,
    list_session_groups,
    metadata,
)

STATUS = {
    "complete": api_pb2.STATUS_SUCCESS,
    "pruned": api_pb2.STATUS_FAILURE,
    "failed": api_pb2.STATUS_FAILURE,
    "rejected": api_pb2.STATUS_FAILURE,
}


def load(path):
    acc = EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def plugin_content(acc, tag):
    """Return the HParamsPluginData bytes of `tag`, whose summaries carry them as metadata."""
    assert tag in acc.Tags()["tensors"], f"{acc.path}: no {tag}; have {acc.Tags()['tensors']}"
    plugin_data = acc.SummaryMetadata(tag).plugin_data
    assert plugin_data.plugin_name == metadata.PLUGIN_NAME, plugin_data
    return plugin_data.content


def in_domain(info, value):
    """Return whether `value` passes the dashboard's filter for the domain of `info`."""
    if info.HasField("domain_interval"):
        return info.domain_interval.min_value <= value.number_value <= info.domain_interval.max_value
    return value in info.domain_discrete.values


def matches(value, text):
    """Return whether a session's `google.protobuf.Value` equals the study's source text of it."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return math.isclose(value.number_value, float(text), rel_tol=1e-12)
    if kind == "bool_value":
        return text == ("true" if value.bool_value else "false")
    return value.string_value == text.strip('"')


def check_experiment(logdir, metric_tag, params):
    content = plugin_content(load(logdir), metadata.EXPERIMENT_TAG)
    experiment = metadata.parse_experiment_plugin_data(content)
    infos = {info.name: info for info in experiment.hparam_infos}
    assert sorted(infos) == sorted(params), f"hparam_infos {sorted(infos)}, search parameters {sorted(params)}"
    for info in infos.values():
        assert info.type != api_pb2.DATA_TYPE_UNSET, info
        assert info.WhichOneof("domain") is not None, f"{info.name} has no domain"
    tags = [m.name.tag for m in experiment.metric_infos]
    assert tags == [metric_tag], f"metric_infos {tags}"
    return infos


def check_trial(logdir, trial, infos, metric_tag):
    name = f"trial-{trial['number']}"
    run = os.path.join(logdir, name)
    assert os.path.isdir(run), f"no run folder {run}"
    acc = load(run)
    start = metadata.parse_session_start_info_plugin_data(plugin_content(acc, metadata.SESSION_START_INFO_TAG))
    params = dict(trial["params"])
    assert sorted(start.hparams) == sorted(params), f"{name}: session hparams {sorted(start.hparams)}, trial {params}"
    for param, text in params.items():
        value = start.hparams[param]
        assert matches(value, text), f"{name}: {param} is {value} in the session, {text} in the study"
        assert in_domain(infos[param], value), f"{name}: {param} = {value} outside {infos[param]}"
    assert math.isclose(start.start_time_secs, trial["started"], abs_tol=1e-3), (start, trial["started"])
    assert start.group_name == name, start.group_name

    end = metadata.parse_session_end_info_plugin_data(plugin_content(acc, metadata.SESSION_END_INFO_TAG))
    expected = STATUS[trial["state"]]
    assert end.status == expected, f"{name} ({trial['state']}): status {api_pb2.Status.Name(end.status)}"
    assert end.end_time_secs >= start.start_time_secs, end

    if trial["state"] in ("complete", "pruned"):
        assert metric_tag in acc.Tags()["scalars"], f"{name}: no scalar {metric_tag}; have {acc.Tags()['scalars']}"
        logged = [(e.step, e.value) for e in acc.Scalars(metric_tag)]
        recorded = list(enumerate(trial["epochs"], start=1))
        assert [s for s, _ in logged] == [s for s, _ in recorded], f"{name}: steps {logged}, study {recorded}"
        for (step, value), (_, stored) in zip(logged, recorded):
            # Scalars are stored as 32-bit floats.
            assert math.isclose(value, stored, rel_tol=1e-6), f"{name} epoch {step}: {value} vs {stored}"


def check_dashboard(logdir, metric_tag, trials):
    """Load the logdir as the HParams dashboard does, through the plugin's backend."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    tb_context = base_plugin.TBContext(
        logdir=logdir,
        multiplexer=multiplexer,
        data_provider=data_provider.MultiplexerDataProvider(multiplexer, logdir),
    )
    backend = backend_context.Context(tb_context)
    request_context = context.RequestContext()
    experiment = get_experiment.Handler(request_context, backend, "", api_pb2.GetExperimentRequest()).run()
    assert [m.name.tag for m in experiment.metric_infos] == [metric_tag], experiment.metric_infos

    request = api_pb2.ListSessionGroupsRequest(
        allowed_statuses=[api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE],
        col_params=[api_pb2.ColParams(metric=api_pb2.MetricName(tag=metric_tag))],
        aggregation_type=api_pb2.AGGREGATION_AVG,
        slice_size=1000,
    )
    response = list_session_groups.Handler(request_context, backend, "", request).run()
    sessions = {s.name: s for group in response.session_groups for s in group.sessions}
    expected = {f"trial-{t['number']}" for t in trials}
    assert set(sessions) == expected, f"dashboard sessions {sorted(sessions)}, trials {sorted(expected)}"
    for trial in trials:
        session = sessions[f"trial-{trial['number']}"]
        assert session.status == STATUS[trial["state"]], session
        if trial["state"] in ("complete", "pruned"):
            values = [m.value for m in session.metric_values if m.name.tag == metric_tag]
            assert values, f"trial {trial['number']} has no {metric_tag} in the dashboard"
            assert math.isclose(values[0], trial["epochs"][-1], rel_tol=1e-6), (values, trial["epochs"])


def main():
    logdir, study_json, metric_tag, params = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    with open(study_json) as f:
        trials = json.load(f)["trials"]
    assert trials, "the study has no trials"
    infos = check_experiment(logdir, metric_tag, params)
    for trial in trials:
        check_trial(logdir, trial, infos, metric_tag)
    check_dashboard(logdir, metric_tag, trials)
    states = sorted({t["state"] for t in trials})
    print(f"ok: {len(infos)} hparams, {len(trials)} sessions ({', '.join(states)})")


if __name__ == "__main__":
    main()
