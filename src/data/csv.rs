//! Numeric CSV files (optionally gzip): one sample per row, one column of
//! integer class labels, an optional header row.

use super::{read_maybe_gzip, DataError, Dataset, LabelColumn};
use std::path::Path;

pub fn load(path: &Path, label: &LabelColumn) -> Result<Dataset, DataError> {
    let bytes = read_maybe_gzip(path)?;
    let text =
        String::from_utf8(bytes).map_err(|_| DataError::invalid(path, "CSV", "not UTF-8 text"))?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .peekable();
    let header: Option<Vec<String>> = match lines.peek() {
        Some((_, first)) if first.split(',').any(|f| f.trim().parse::<f64>().is_err()) => {
            let names = first
                .split(',')
                .map(|f| f.trim().trim_matches('"').to_string())
                .collect();
            lines.next();
            Some(names)
        }
        _ => None,
    };
    let mut x = Vec::new();
    let mut labels = Vec::new();
    let mut columns = 0;
    let mut label_index = usize::MAX;
    for (number, line) in lines {
        let fields: Vec<&str> = line.split(',').collect();
        if columns == 0 {
            columns = fields.len();
            if *label != LabelColumn::None {
                label_index = resolve_label(path, label, header.as_deref(), columns)?;
            }
        }
        if fields.len() != columns {
            return Err(DataError::invalid(
                path,
                "CSV",
                format!(
                    "line {} has {} columns, the first row has {columns}",
                    number + 1,
                    fields.len()
                ),
            ));
        }
        for (i, field) in fields.iter().enumerate() {
            let value: f64 = field.trim().parse().map_err(|_| {
                DataError::invalid(
                    path,
                    "CSV",
                    format!(
                        "line {}, column {}: `{}` is not a number",
                        number + 1,
                        i + 1,
                        field.trim()
                    ),
                )
            })?;
            if i == label_index {
                if value < 0.0 || value.fract() != 0.0 {
                    return Err(DataError::invalid(
                        path,
                        "CSV",
                        format!(
                            "line {}: label `{}` is not a class index (0, 1, 2, ...)",
                            number + 1,
                            field.trim()
                        ),
                    ));
                }
                labels.push(value as usize);
            } else {
                x.push(value as f32);
            }
        }
        if label_index == usize::MAX {
            labels.push(0);
        }
    }
    if labels.is_empty() {
        return Err(DataError::invalid(path, "CSV", "no data rows"));
    }
    Ok(Dataset {
        x,
        labels,
        features: if label_index == usize::MAX {
            columns
        } else {
            columns - 1
        },
        source: format!("`{}`", path.display()),
    })
}

/// Header names taken as the label column when `--label-column` is not
/// given, compared without case.
const LABEL_NAMES: [&str; 5] = ["label", "labels", "class", "target", "y"];

fn resolve_label(
    path: &Path,
    label: &LabelColumn,
    header: Option<&[String]>,
    columns: usize,
) -> Result<usize, DataError> {
    let index = match label {
        LabelColumn::Auto => header
            .and_then(|names| {
                names.iter().position(|h| {
                    let h = h.to_lowercase();
                    LABEL_NAMES.contains(&h.as_str())
                })
            })
            .unwrap_or(columns - 1),
        LabelColumn::None => columns - 1,
        LabelColumn::Index(i) => *i,
        LabelColumn::Name(name) => {
            let Some(header) = header else {
                return Err(DataError::invalid(
                    path,
                    "CSV",
                    format!("label column `{name}` given by name, but the file has no header row"),
                ));
            };
            header.iter().position(|h| h == name).ok_or_else(|| {
                DataError::invalid(
                    path,
                    "CSV",
                    format!(
                        "no column named `{name}`; the header has {}",
                        header.join(", ")
                    ),
                )
            })?
        }
    };
    if index >= columns || columns < 2 {
        return Err(DataError::invalid(
            path,
            "CSV",
            format!("label column {index} is out of range for {columns} columns"),
        ));
    }
    Ok(index)
}
