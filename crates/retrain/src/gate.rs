//! The declarative validation gate: every rule is evaluated (not just up to the first failure)
//! so the history says everything that was wrong with a candidate.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::GateConfig;

/// One rule's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub rule: String,
    pub passed: bool,
    #[serde(deserialize_with = "crate::history::nan_null::f64")]
    pub value: f64,
    #[serde(deserialize_with = "crate::history::nan_null::f64")]
    pub threshold: f64,
    pub reason: String,
}

/// What the gate looks at.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    pub candidate: BTreeMap<String, f64>,
    pub champion: Option<BTreeMap<String, f64>>,
    pub ann_recall_at_10: f64,
    /// Largest |‖e‖ − 1| over sampled user and item embeddings; NaN if any value was not finite.
    pub max_norm_error: f64,
}

fn decide(rule: &str, value: f64, threshold: f64, passed: bool, reason: String) -> Decision {
    Decision {
        rule: rule.into(),
        passed,
        value,
        threshold,
        reason,
    }
}

/// Applies every rule of `g` to `e`.
pub fn evaluate(g: &GateConfig, e: &Evidence) -> Vec<Decision> {
    let mut out = Vec::new();
    let finite = e.max_norm_error.is_finite() && e.candidate.values().all(|v| v.is_finite());
    out.push(decide(
        "finite",
        if finite { 1.0 } else { 0.0 },
        1.0,
        finite,
        if finite {
            "all embeddings and metrics are finite".into()
        } else {
            "NaN or infinite values in the candidate's embeddings or metrics".into()
        },
    ));
    let norm_ok = e.max_norm_error <= g.max_norm_error;
    out.push(decide(
        "embedding_norms",
        e.max_norm_error,
        g.max_norm_error,
        norm_ok,
        format!(
            "max |‖e‖−1| {:.2e} {} {:.2e}",
            e.max_norm_error,
            if norm_ok { "≤" } else { ">" },
            g.max_norm_error
        ),
    ));
    let metric = &g.metric;
    let value = e.candidate.get(metric).copied().unwrap_or(f64::NAN);
    let floor_ok = value >= g.min_metric;
    out.push(decide(
        "min_metric",
        value,
        g.min_metric,
        floor_ok,
        format!(
            "{metric} {value:.4} {} floor {:.4}",
            if floor_ok { "≥" } else { "<" },
            g.min_metric
        ),
    ));
    match &e.champion {
        Some(champ) => {
            let base = champ.get(metric).copied().unwrap_or(f64::NAN);
            let need = base + g.min_delta;
            let ok = value >= need;
            out.push(decide(
                "vs_champion",
                value,
                need,
                ok,
                format!(
                    "{metric} {value:.4} {} champion {base:.4} {:+.4}",
                    if ok { "≥" } else { "<" },
                    g.min_delta
                ),
            ));
            let cov = e.candidate.get("coverage@10").copied().unwrap_or(0.0);
            let need = g.min_coverage_ratio * champ.get("coverage@10").copied().unwrap_or(0.0);
            let ok = cov >= need;
            out.push(decide(
                "coverage",
                cov,
                need,
                ok,
                format!(
                    "coverage@10 {cov:.4} {} {:.2} × champion = {need:.4}",
                    if ok { "≥" } else { "<" },
                    g.min_coverage_ratio
                ),
            ));
        }
        None => out.push(decide(
            "vs_champion",
            value,
            f64::NAN,
            true,
            "no champion serving: only the absolute rules apply".into(),
        )),
    }
    let ok = e.ann_recall_at_10 >= g.min_ann_recall;
    out.push(decide(
        "ann_recall",
        e.ann_recall_at_10,
        g.min_ann_recall,
        ok,
        format!(
            "index recall@10 {:.4} {} {:.4}",
            e.ann_recall_at_10,
            if ok { "≥" } else { "<" },
            g.min_ann_recall
        ),
    ));
    out
}

/// The failed rules' reasons, joined (empty when the gate passed).
pub fn failures(decisions: &[Decision]) -> String {
    decisions
        .iter()
        .filter(|d| !d.passed)
        .map(|d| format!("{}: {}", d.rule, d.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(recall: f64, coverage: f64) -> BTreeMap<String, f64> {
        BTreeMap::from([
            ("recall@50".to_string(), recall),
            ("coverage@10".to_string(), coverage),
        ])
    }

    fn evidence(recall: f64, coverage: f64) -> Evidence {
        Evidence {
            candidate: metrics(recall, coverage),
            champion: Some(metrics(0.30, 0.5)),
            ann_recall_at_10: 0.97,
            max_norm_error: 1e-6,
        }
    }

    #[test]
    fn a_candidate_within_the_tolerance_passes_every_rule() {
        let d = evaluate(&GateConfig::default(), &evidence(0.296, 0.45));
        assert!(d.iter().all(|d| d.passed), "{}", failures(&d));
    }

    #[test]
    fn a_worse_candidate_fails_with_the_numbers_in_the_reason() {
        let d = evaluate(&GateConfig::default(), &evidence(0.29, 0.45));
        let f = failures(&d);
        assert!(
            f.contains("vs_champion") && f.contains("0.2900") && f.contains("0.3000"),
            "{f}"
        );
        assert!(!f.contains("coverage"), "{f}");
    }

    #[test]
    fn low_coverage_bad_norms_and_a_poor_index_each_fail_their_rule() {
        let mut e = evidence(0.35, 0.3);
        e.max_norm_error = 0.2;
        e.ann_recall_at_10 = 0.5;
        let failed: Vec<String> = evaluate(&GateConfig::default(), &e)
            .into_iter()
            .filter(|d| !d.passed)
            .map(|d| d.rule)
            .collect();
        assert_eq!(failed, ["embedding_norms", "coverage", "ann_recall"]);
    }

    #[test]
    fn nan_embeddings_fail_the_finite_rule() {
        let mut e = evidence(0.35, 0.5);
        e.max_norm_error = f64::NAN;
        let d = evaluate(&GateConfig::default(), &e);
        assert!(!d[0].passed && !d[1].passed);
    }

    #[test]
    fn without_a_champion_only_absolute_rules_apply() {
        let mut e = evidence(0.01, 0.0);
        e.champion = None;
        let g = GateConfig {
            min_metric: 0.05,
            ..Default::default()
        };
        let f = failures(&evaluate(&g, &e));
        assert!(f.starts_with("min_metric"), "{f}");
    }
}
