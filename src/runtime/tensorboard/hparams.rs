//! Summaries of TensorBoard's HParams plugin: an experiment (the
//! hyperparameters and metrics of a sweep) and the start and end of each
//! session (one training run at one point).
//!
//! The messages and field numbers are those of
//! `tensorboard/plugins/hparams/api.proto` and `plugin_data.proto` (checked
//! against TensorBoard 2.21). Each summary is written the way
//! `tensorboard.plugins.hparams.summary_v2` writes it: at step 0, with an
//! `HParamsPluginData` message as the plugin content and an empty
//! `DT_FLOAT` tensor of shape `[0]` as the value.

use super::{wall_time, EventWriter, Message};

pub const EXPERIMENT_TAG: &str = "_hparams_/experiment";
pub const SESSION_START_TAG: &str = "_hparams_/session_start_info";
pub const SESSION_END_TAG: &str = "_hparams_/session_end_info";

/// A hyperparameter's value, encoded as a `google.protobuf.Value`.
#[derive(Debug, Clone, PartialEq)]
pub enum HParamValue {
    Number(f64),
    Text(String),
    Bool(bool),
}

/// `tensorboard.hparams.DataType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    String = 1,
    Bool = 2,
    Float64 = 3,
}

/// The values a hyperparameter can take, which the dashboard's filters
/// offer.
#[derive(Debug, Clone, PartialEq)]
pub enum HParamDomain {
    Discrete(Vec<HParamValue>),
    /// The closed interval `[min, max]`.
    Interval {
        min: f64,
        max: f64,
    },
}

/// One hyperparameter of an experiment (`tensorboard.hparams.HParamInfo`).
#[derive(Debug, Clone, PartialEq)]
pub struct HParamInfo {
    pub name: String,
    pub data_type: DataType,
    pub domain: HParamDomain,
}

/// `tensorboard.hparams.DatasetType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetType {
    Training = 1,
    Validation = 2,
}

/// A metric of an experiment: a scalar tag that every session's run logs.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricInfo {
    pub tag: String,
    pub dataset: DatasetType,
}

/// `tensorboard.hparams.Status`. TensorBoard 2.21 defines these and
/// `STATUS_UNKNOWN` (0), which a session without an end has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Success = 1,
    Failure = 2,
    Running = 3,
}

/// The start of a session (`tensorboard.hparams.SessionStartInfo`).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionStart {
    /// The session's hyperparameter values, by name.
    pub hparams: Vec<(String, HParamValue)>,
    /// Sessions of one group are repeats at the same point.
    pub group_name: String,
    /// Seconds since the Unix epoch.
    pub start_time_secs: f64,
}

/// Encodes a `google.protobuf.Value`.
fn value(v: &HParamValue) -> Message {
    let mut m = Message::default();
    match v {
        HParamValue::Number(x) => m.double(2, *x), // Value.number_value
        HParamValue::Text(s) => m.bytes(3, s.as_bytes()), // .string_value
        HParamValue::Bool(b) => m.int64(4, i64::from(*b)), // .bool_value
    }
    m
}

fn hparam_info(info: &HParamInfo) -> Message {
    let mut m = Message::default();
    m.bytes(1, info.name.as_bytes()); // HParamInfo.name
    m.int64(4, info.data_type as i64); // .type
    match &info.domain {
        HParamDomain::Discrete(values) => {
            let mut list = Message::default();
            for v in values {
                list.bytes(1, &value(v).0); // ListValue.values
            }
            m.bytes(5, &list.0); // .domain_discrete
        }
        HParamDomain::Interval { min, max } => {
            let mut interval = Message::default();
            interval.double(1, *min); // Interval.min_value
            interval.double(2, *max); // .max_value
            m.bytes(6, &interval.0); // .domain_interval
        }
    }
    m
}

fn metric_info(info: &MetricInfo) -> Message {
    // An empty group puts the metric's scalars in the session's own run.
    let mut name = Message::default();
    name.bytes(2, info.tag.as_bytes()); // MetricName.tag
    let mut m = Message::default();
    m.bytes(1, &name.0); // MetricInfo.name
    m.int64(5, info.dataset as i64); // .dataset_type
    m
}

fn session_start(start: &SessionStart) -> Message {
    let mut m = Message::default();
    for (name, v) in &start.hparams {
        // A map field is a repeated message of key and value.
        let mut entry = Message::default();
        entry.bytes(1, name.as_bytes());
        entry.bytes(2, &value(v).0);
        m.bytes(1, &entry.0); // SessionStartInfo.hparams
    }
    m.bytes(4, start.group_name.as_bytes()); // .group_name
    m.double(5, start.start_time_secs); // .start_time_secs
    m
}

/// Wraps one member of `HParamsPluginData`'s `data` oneof (field 2
/// experiment, 3 session start, 4 session end). Its `version` is 0, the
/// default, and so not written.
fn plugin_data(field: u32, data: &Message) -> Vec<u8> {
    let mut m = Message::default();
    m.bytes(field, &data.0);
    m.0
}

impl EventWriter {
    /// Writes an HParams summary with the serialized `HParamsPluginData`
    /// `content` under `tag`.
    fn hparams_summary(&mut self, tag: &str, content: &[u8]) -> std::io::Result<()> {
        let mut shape = Message::default();
        shape.bytes(2, &[]); // TensorShapeProto.dim: one dimension of size 0
        let mut tensor = Message::default();
        tensor.int64(1, 1); // TensorProto.dtype = DT_FLOAT
        tensor.bytes(2, &shape.0); // .tensor_shape
        let mut plugin = Message::default();
        plugin.bytes(1, b"hparams"); // PluginData.plugin_name
        plugin.bytes(2, content); // .content
        let mut metadata = Message::default();
        metadata.bytes(1, &plugin.0); // SummaryMetadata.plugin_data
        let mut v = Message::default();
        v.bytes(1, tag.as_bytes()); // Value.tag
        v.bytes(8, &tensor.0); // .tensor
        v.bytes(9, &metadata.0); // .metadata
        self.summary(0, v)?;
        self.flush()
    }

    /// Writes the experiment summary, which belongs in the root folder of
    /// the sessions' runs.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn hparams_experiment(
        &mut self,
        hparams: &[HParamInfo],
        metrics: &[MetricInfo],
    ) -> std::io::Result<()> {
        let mut experiment = Message::default();
        experiment.double(3, wall_time()); // Experiment.time_created_secs
        for info in hparams {
            experiment.bytes(4, &hparam_info(info).0); // .hparam_infos
        }
        for info in metrics {
            experiment.bytes(5, &metric_info(info).0); // .metric_infos
        }
        self.hparams_summary(EXPERIMENT_TAG, &plugin_data(2, &experiment))
    }

    /// Writes the start of the session whose run this file belongs to.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn hparams_session_start(&mut self, start: &SessionStart) -> std::io::Result<()> {
        self.hparams_summary(SESSION_START_TAG, &plugin_data(3, &session_start(start)))
    }

    /// Writes the end of the session whose run this file belongs to, now.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn hparams_session_end(&mut self, status: Status) -> std::io::Result<()> {
        let mut end = Message::default();
        end.int64(1, status as i64); // SessionEndInfo.status
        end.double(2, wall_time()); // .end_time_secs
        self.hparams_summary(SESSION_END_TAG, &plugin_data(4, &end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bool_values_keep_false() {
        // `bool_value` is a member of a oneof, so even `false` is written:
        // without it the value would read as unset.
        assert_eq!(value(&HParamValue::Bool(false)).0, vec![0x20, 0x00]);
    }

    #[test]
    fn interval_domain_encodes_both_ends() {
        let info = HParamInfo {
            name: "lr".into(),
            data_type: DataType::Float64,
            domain: HParamDomain::Interval { min: 0.0, max: 1.0 },
        };
        let mut expected = vec![0x0a, 2, b'l', b'r', 0x20, 3, 0x32, 18, 0x09];
        expected.extend_from_slice(&0.0f64.to_le_bytes());
        expected.push(0x11);
        expected.extend_from_slice(&1.0f64.to_le_bytes());
        assert_eq!(hparam_info(&info).0, expected);
    }
}
