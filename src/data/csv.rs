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
/// given, compared without case. Two columns with such names are an error.
const LABEL_NAMES: [&str; 5] = ["label", "labels", "class", "target", "y"];

fn resolve_label(
    path: &Path,
    label: &LabelColumn,
    header: Option<&[String]>,
    columns: usize,
) -> Result<usize, DataError> {
    let index = match label {
        LabelColumn::Auto => auto_label(path, header.unwrap_or_default(), columns)?,
        LabelColumn::None => columns - 1,
        LabelColumn::Index(i) => *i,
        LabelColumn::Name(name) => named_label(path, name, header)?,
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

/// Finds the one header column with a name from [`LABEL_NAMES`], else
/// takes the last column.
///
/// # Errors
/// When several columns have such names, because picking one would
/// silently train on the wrong labels.
fn auto_label(path: &Path, names: &[String], columns: usize) -> Result<usize, DataError> {
    let candidates: Vec<usize> = (0..names.len())
        .filter(|&i| LABEL_NAMES.contains(&names[i].to_lowercase().as_str()))
        .collect();
    match candidates[..] {
        [] => Ok(columns - 1),
        [index] => Ok(index),
        _ => {
            let descriptions = candidates
                .iter()
                .map(|&i| format!("{i} (`{}`)", names[i]))
                .collect();
            Err(DataError::Unsupported {
                path: path.to_path_buf(),
                reason: format!(
                    "columns {} could each be the label; pass --label-column with the 0-based index or the name of the label column",
                    join_with_and(descriptions)
                ),
            })
        }
    }
}

/// Finds the one header column named `name`.
fn named_label(path: &Path, name: &str, header: Option<&[String]>) -> Result<usize, DataError> {
    let Some(header) = header else {
        return Err(DataError::invalid(
            path,
            "CSV",
            format!("label column `{name}` given by name, but the file has no header row"),
        ));
    };
    let matches: Vec<usize> = (0..header.len()).filter(|&i| header[i] == name).collect();
    match matches[..] {
        [] => Err(DataError::invalid(
            path,
            "CSV",
            format!(
                "no column named `{name}`; the header has {}",
                header.join(", ")
            ),
        )),
        [index] => Ok(index),
        _ => {
            let indices = matches.iter().map(usize::to_string).collect();
            Err(DataError::Unsupported {
                path: path.to_path_buf(),
                reason: format!(
                    "`{name}` names more than one column ({}); pass --label-column with the 0-based index of the label column",
                    join_with_and(indices)
                ),
            })
        }
    }
}

/// Joins items for a message: "a", "a and b", "a, b and c".
fn join_with_and(mut items: Vec<String>) -> String {
    match items.pop() {
        Some(last) if !items.is_empty() => format!("{} and {last}", items.join(", ")),
        Some(last) => last,
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `text` to a file of its own and loads it with `label`.
    fn load_text(name: &str, text: &str, label: &LabelColumn) -> Result<Dataset, DataError> {
        let dir = std::env::temp_dir().join(format!("kiln-csv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.csv"));
        std::fs::write(&path, text).unwrap();
        load(&path, label)
    }

    #[test]
    fn label_found_by_header_name() {
        let data = load_text("by-name", "p0,Class,p1\n1,2,3\n4,5,6\n", &LabelColumn::Auto).unwrap();
        assert_eq!(data.labels, vec![2, 5]);
        assert_eq!(data.x, vec![1.0, 3.0, 4.0, 6.0]);
    }

    #[test]
    fn two_label_names_are_ambiguous() {
        let text = "y,p0,class\n1,2,3\n";
        let error = load_text("two-names", text, &LabelColumn::Auto)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("columns 0 (`y`) and 2 (`class`) could each be the label"),
            "{error}"
        );
        assert!(error.contains("pass --label-column"), "{error}");
    }

    #[test]
    fn repeated_label_name_is_ambiguous() {
        let text = "label,p0,label\n1,2,3\n";
        let error = load_text("repeated", text, &LabelColumn::Auto)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("columns 0 (`label`) and 2 (`label`) could each be the label"),
            "{error}"
        );
    }

    #[test]
    fn repeated_requested_name_is_ambiguous() {
        let text = "digit,p0,digit\n1,2,3\n";
        let label = LabelColumn::Name("digit".into());
        let error = load_text("repeated-request", text, &label)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("`digit` names more than one column (0 and 2)"),
            "{error}"
        );
        assert!(error.contains("the 0-based index"), "{error}");
    }

    #[test]
    fn label_column_option_resolves_ambiguity() {
        let text = "y,p0,class\n1,2,3\n";
        let by_name = load_text("resolved-name", text, &LabelColumn::Name("class".into())).unwrap();
        assert_eq!(by_name.labels, vec![3]);
        let by_index = load_text("resolved-index", text, &LabelColumn::Index(0)).unwrap();
        assert_eq!(by_index.labels, vec![1]);
    }
}
