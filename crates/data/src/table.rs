//! Format detection and a streaming row scanner. Every reader goes through [`scan`], so CSV,
//! gzip CSV and Parquet accept exactly the same column mappings.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

use crate::{DataError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    CsvGz,
    Parquet,
}

impl Format {
    /// By file name: `*.parquet`/`*.pq`, `*.gz`, anything else is CSV.
    pub fn from_path(path: &Path) -> Format {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if name.ends_with(".parquet") || name.ends_with(".pq") {
            Format::Parquet
        } else if name.ends_with(".gz") {
            Format::CsvGz
        } else {
            Format::Csv
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::CsvGz => "csv.gz",
            Format::Parquet => "parquet",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "csv" => Ok(Format::Csv),
            "csv.gz" | "gz" => Ok(Format::CsvGz),
            "parquet" => Ok(Format::Parquet),
            other => Err(format!(
                "unknown format {other:?} (expected csv, csv.gz or parquet)"
            )),
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn format_err(path: &Path, reason: impl ToString) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The header of a table file.
pub fn columns(path: &Path) -> Result<Vec<String>> {
    match Format::from_path(path) {
        Format::Parquet => {
            let file = File::open(path).map_err(io(path))?;
            let reader = SerializedFileReader::new(file).map_err(|e| format_err(path, e))?;
            let schema = reader.metadata().file_metadata().schema_descr_ptr();
            Ok(schema
                .root_schema()
                .get_fields()
                .iter()
                .map(|f| f.name().to_string())
                .collect())
        }
        _ => {
            let mut reader = csv_reader(path)?;
            let headers = reader.headers().map_err(|e| format_err(path, e))?;
            if headers.iter().all(|h| h.trim().is_empty()) {
                return Err(DataError::Empty {
                    path: path.to_path_buf(),
                });
            }
            Ok(headers.iter().map(|h| h.trim().to_string()).collect())
        }
    }
}

fn csv_reader(path: &Path) -> Result<csv::Reader<Box<dyn Read>>> {
    let file = File::open(path).map_err(io(path))?;
    let inner: Box<dyn Read> = match Format::from_path(path) {
        Format::CsvGz => Box::new(MultiGzDecoder::new(BufReader::with_capacity(1 << 20, file))),
        _ => Box::new(BufReader::with_capacity(1 << 20, file)),
    };
    Ok(csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(inner))
}

/// Positions of `wanted` in `present`, or a [`DataError::MissingColumn`] naming the first absent.
pub fn resolve_columns(path: &Path, present: &[String], wanted: &[&str]) -> Result<Vec<usize>> {
    wanted
        .iter()
        .map(|w| {
            present
                .iter()
                .position(|p| p == w)
                .ok_or_else(|| DataError::MissingColumn {
                    path: path.to_path_buf(),
                    column: w.to_string(),
                    present: present.join(", "),
                })
        })
        .collect()
}

/// Streams the rows of a table, calling `f(row_number, values)` with the values of the `wanted`
/// columns in that order (row numbers start at 1 for the first data row). Missing values
/// (Parquet nulls, empty CSV cells) are empty strings.
pub fn scan<F>(path: &Path, wanted: &[&str], mut f: F) -> Result<usize>
where
    F: FnMut(usize, &[&str]) -> Result<()>,
{
    let present = columns(path)?;
    let positions = resolve_columns(path, &present, wanted)?;
    let mut rows = 0usize;
    match Format::from_path(path) {
        Format::Parquet => {
            let file = File::open(path).map_err(io(path))?;
            let reader = SerializedFileReader::new(file).map_err(|e| format_err(path, e))?;
            let iter = reader.get_row_iter(None).map_err(|e| format_err(path, e))?;
            let mut owned: Vec<String> = vec![String::new(); wanted.len()];
            for row in iter {
                let row = row.map_err(|e| format_err(path, e))?;
                rows += 1;
                for (slot, &pos) in owned.iter_mut().zip(&positions) {
                    slot.clear();
                    if let Some((_, field)) = row.get_column_iter().nth(pos) {
                        field_to_string(field, slot);
                    }
                }
                let values: Vec<&str> = owned.iter().map(String::as_str).collect();
                f(rows, &values)?;
            }
        }
        _ => {
            let mut reader = csv_reader(path)?;
            let mut record = csv::StringRecord::new();
            loop {
                match reader.read_record(&mut record) {
                    Ok(false) => break,
                    Ok(true) => {}
                    Err(e) => return Err(format_err(path, e)),
                }
                rows += 1;
                let values: Vec<&str> = positions
                    .iter()
                    .map(|&p| record.get(p).unwrap_or("").trim())
                    .collect();
                f(rows, &values)?;
            }
        }
    }
    Ok(rows)
}

fn field_to_string(field: &Field, out: &mut String) {
    use std::fmt::Write;
    match field {
        Field::Null => {}
        Field::Str(s) => out.push_str(s),
        Field::Bytes(b) => out.push_str(&String::from_utf8_lossy(b.data())),
        // Parquet timestamps become unix seconds so they parse like every other format.
        Field::TimestampMillis(ms) => {
            let _ = write!(out, "{}", ms.div_euclid(1000));
        }
        Field::TimestampMicros(us) => {
            let _ = write!(out, "{}", us.div_euclid(1_000_000));
        }
        other => {
            let _ = write!(out, "{other}");
        }
    }
}

/// Writes a small table of strings (feature tables) as CSV, gzip CSV or Parquet (all columns
/// UTF-8) by `path`'s extension.
pub fn write_strings(path: &Path, headers: &[&str], rows: &[Vec<String>]) -> Result<()> {
    use std::io::Write;
    use std::sync::Arc;

    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;

    let file = File::create(path).map_err(io(path))?;
    match Format::from_path(path) {
        Format::Parquet => {
            let err = |e: parquet::errors::ParquetError| format_err(path, e);
            let fields: Vec<String> = headers
                .iter()
                .map(|h| format!("REQUIRED BYTE_ARRAY {h} (UTF8);"))
                .collect();
            let schema = format!("message table {{ {} }}", fields.join(" "));
            let schema =
                Arc::new(parquet::schema::parser::parse_message_type(&schema).map_err(err)?);
            let props = Arc::new(WriterProperties::builder().build());
            let mut writer = SerializedFileWriter::new(file, schema, props).map_err(err)?;
            let mut rg = writer.next_row_group().map_err(err)?;
            let mut col = 0;
            while let Some(mut c) = rg.next_column().map_err(err)? {
                let values: Vec<ByteArray> = rows
                    .iter()
                    .map(|r| ByteArray::from(r[col].as_bytes().to_vec()))
                    .collect();
                c.typed::<ByteArrayType>()
                    .write_batch(&values, None, None)
                    .map_err(err)?;
                c.close().map_err(err)?;
                col += 1;
            }
            rg.close().map_err(err)?;
            writer.close().map_err(err)?;
            Ok(())
        }
        format => {
            let sink: Box<dyn Write> = if format == Format::CsvGz {
                Box::new(flate2::write::GzEncoder::new(
                    std::io::BufWriter::new(file),
                    flate2::Compression::fast(),
                ))
            } else {
                Box::new(std::io::BufWriter::new(file))
            };
            let mut w = csv::Writer::from_writer(sink);
            let csv_err = |e: csv::Error| format_err(path, e);
            w.write_record(headers).map_err(csv_err)?;
            for r in rows {
                w.write_record(r).map_err(csv_err)?;
            }
            w.into_inner().map_err(|e| format_err(path, e))?;
            Ok(())
        }
    }
}
