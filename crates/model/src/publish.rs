//! Writing a trained model as an immutable artifact version (`<root>/models/<name>/<version>/`).

use std::path::Path;

use tandem_artifact::Published;
use tandem_types::{ModelManifest, ModelVersion};

use crate::model::TwoTower;
use crate::{ModelError, Result};

pub use tandem_types::MODELS;

/// sha256 over the architecture and both feature schemas: equal hashes accept the same inputs.
pub fn feature_schema_hash(model: &TwoTower) -> String {
    let sig = serde_json::json!({
        "config": model.user.cfg,
        "user": model.user.users.schema.signature(),
        "item": model.item.items.schema.signature(),
    });
    tandem_artifact::sha256_hex(sig.to_string().as_bytes())
}

/// Publishes `model` atomically; with `version: None` the next free version is taken.
pub fn publish_model(
    root: &Path,
    name: &str,
    version: Option<ModelVersion>,
    model: &TwoTower,
    meta: &ModelManifest,
) -> Result<Published> {
    let published = tandem_artifact::publish(root, MODELS, name, version, meta, |dir| {
        model
            .write_payload(dir)
            .map_err(|e: ModelError| e.to_string())
    })?;
    Ok(published)
}
