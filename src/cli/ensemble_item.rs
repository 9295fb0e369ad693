//! `kiln train FILE --model ENSEMBLE`: trains the members an ensemble item
//! lists (or takes a study's best trials), then pools them as `kiln
//! ensemble` does and writes `<checkpoint-dir>/<NAME>.ensemble.safetensors`.
//! The infix keeps an ensemble named `best` or `last` from overwriting a
//! model's `best.safetensors` or `last.safetensors` in the same folder.

use super::ensemble::{
    pool, study_members, train_members, MemberPlan, PoolOptions, SharedTraining,
};
use super::exit;
use super::train::{
    apply_overrides, check_file, instantiate_model, label_column, test_split, TrainArgs,
};
use crate::check::ensemble::{EnsembleSpec, MemberSpec, Members};
use crate::check::{CheckReport, Program};
use crate::data;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The validation fraction when `--val-split` is not given, as for
/// `kiln train` of a model.
const DEFAULT_VAL_SPLIT: f64 = 0.1;

/// Trains and pools the ensemble item that `--model` (or the file's first
/// item) selects.
///
/// # Errors
/// When the file is invalid, an option does not apply to ensembles, the
/// data does not load, or a member fails to train or open.
pub(crate) fn train(
    args: &TrainArgs,
    source: &str,
    interrupt: Arc<AtomicBool>,
) -> Result<u8, (u8, String)> {
    let usage = |m: String| (exit::USAGE, m);
    reject_model_options(args).map_err(usage)?;
    let file_name = args.file.display().to_string();
    let (program, report) = check_file(source, &file_name).map_err(|m| (exit::INVALID_MODEL, m))?;
    let spec = selected_spec(&program, &report, args.model.as_deref())?;
    if matches!(spec.members, Members::StudyTop { .. }) {
        reject_training_options(args).map_err(usage)?;
    }

    let mut loaded = data::load(&args.data, &label_column(&args.label_column))
        .map_err(|e| usage(e.to_string()))?;
    loaded.train.truncate(args.limit);
    let test = test_split(args.test_data.as_deref(), loaded.test, &args.label_column)?;

    let sources = match &spec.members {
        Members::StudyTop { study, top } => study_members(Path::new(study), Some(*top))?,
        Members::Trained(members) => {
            let plans = plans(&program, members, source, &file_name, args)?;
            let shared = SharedTraining {
                source,
                train: &loaded.train,
                test: test.as_ref(),
                val_split: args.val_split.unwrap_or(DEFAULT_VAL_SPLIT),
                limit: args.limit,
                split_seed: split_seed(&program, members, source, &file_name)?,
                members_dir: args.checkpoint_dir.join(format!("{}.members", spec.name)),
                exec: args.exec,
                interrupt,
                quiet: args.json || args.quiet,
            };
            train_members(plans, &shared)?
        }
    };

    let options = PoolOptions {
        rule: spec.rule,
        select: None,
        rounds: 0,
        out: args
            .checkpoint_dir
            .join(format!("{}.ensemble.safetensors", spec.name)),
        json: args.json,
        quiet: args.quiet,
        exec: args.exec,
    };
    pool(sources, &loaded.train, test.as_ref(), &options)
}

/// Rejects options that choose one model's point or continue one run,
/// because an ensemble's members each have their own.
pub(crate) fn reject_model_options(args: &TrainArgs) -> Result<(), String> {
    let rejected = [
        (!args.set.is_empty(), "--set"),
        (args.seed.is_some(), "--seed"),
        (args.resume.is_some(), "--resume"),
        (args.logdir.is_some(), "--logdir"),
        (args.verify.is_some(), "--verify"),
    ];
    match rejected.iter().find(|(given, _)| *given) {
        Some((_, option)) => Err(format!(
            "{option} applies to one model, not to an ensemble; members train at their models' defaults with the seeds the ensemble lists"
        )),
        None => Ok(()),
    }
}

/// Rejects options that set how members train or which samples they see,
/// for `top()` members. These are a study's trained trials, scored on the
/// validation split that each recorded, so another `--limit` or
/// `--val-split` would put their training samples in that split.
fn reject_training_options(args: &TrainArgs) -> Result<(), String> {
    let rejected = [
        (args.epochs.is_some(), "--epochs"),
        (args.batch_size.is_some(), "--batch-size"),
        (args.lr.is_some(), "--lr"),
        (args.val_split.is_some(), "--val-split"),
        (args.limit.is_some(), "--limit"),
    ];
    match rejected.iter().find(|(given, _)| *given) {
        Some((_, option)) => Err(format!(
            "{option} does not apply to `top()` members: they are already trained, and they are scored on the study's own data split"
        )),
        None => Ok(()),
    }
}

/// Finds the checked ensemble named by `--model`, or the file's first item.
fn selected_spec(
    program: &Program,
    report: &CheckReport,
    model: Option<&str>,
) -> Result<EnsembleSpec, (u8, String)> {
    let item = match model {
        Some(name) => program.ensemble(name),
        None => program.first_item_ensemble(),
    };
    item.and_then(|item| report.ensembles.iter().find(|e| e.name == item.name.name))
        .and_then(|e| e.spec.clone())
        .ok_or_else(|| {
            (
                exit::INVALID_MODEL,
                format!("no valid ensemble `{}` in the file", model.unwrap_or("")),
            )
        })
}

/// Instantiates every member's model at its default point with the
/// member's seed and the command line's overrides.
fn plans(
    program: &Program,
    members: &[MemberSpec],
    source: &str,
    file_name: &str,
    args: &TrainArgs,
) -> Result<Vec<MemberPlan>, (u8, String)> {
    let mut plans = Vec::new();
    for (i, member) in members.iter().enumerate() {
        let ast = program.model(&member.model).ok_or_else(|| {
            (
                exit::INVALID_MODEL,
                format!("no model `{}` in `{file_name}`", member.model),
            )
        })?;
        let (mut instance, point) = instantiate_model(program, ast, source, file_name, &[])
            .map_err(|m| (exit::INVALID_MODEL, m))?;
        apply_overrides(&mut instance, args, None);
        instance.train.seed = member.seed;
        plans.push(MemberPlan {
            model_name: member.model.clone(),
            instance,
            point,
            bootstrap: member.bootstrap,
            label: format!("m{i}-{}-seed{}", member.model, member.seed),
        });
    }
    Ok(plans)
}

/// Returns the seed of the shared validation split: the first member's
/// model's own `seed`, so the split is the one `kiln train` of that model
/// holds out.
fn split_seed(
    program: &Program,
    members: &[MemberSpec],
    source: &str,
    file_name: &str,
) -> Result<u64, (u8, String)> {
    let first = members
        .first()
        .and_then(|m| program.model(&m.model))
        .ok_or_else(|| {
            (
                exit::INVALID_MODEL,
                "the ensemble has no members".to_string(),
            )
        })?;
    let (instance, _) = instantiate_model(program, first, source, file_name, &[])
        .map_err(|m| (exit::INVALID_MODEL, m))?;
    Ok(instance.train.seed)
}
