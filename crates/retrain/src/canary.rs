//! The canary: probe traffic through the live homefeed path while (part of) the fleet serves the
//! candidate.
//!
//! Probe users are held-out users of the cycle; a probe is a real `GetCandidates` call, so it
//! exercises the orchestrator's handshake, the user tower's online features and the ANN host. It
//! measures the error rate, version mismatches, latency and the *live hit rate*: the share of
//! answers that contain at least one of the user's held-out items. The user tower already
//! holds those engagements in the user's history, so the hit rate is not an offline-quality
//! estimate; it is a regression alarm — a version whose live answers stop containing what users
//! just engaged with (a broken vocabulary, shuffled ids, a feature skew between offline and
//! online) falls far below the champion's rate measured just before the rollout.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tandem_client::{ClientOptions, HomefeedClient};
use tandem_types::stats::percentile;
use tandem_types::ModelVersion;

use crate::config::CanaryConfig;
use crate::Result;

/// One user to probe with the items that count as hits.
#[derive(Debug, Clone)]
pub struct ProbeUser {
    pub user: String,
    pub targets: HashSet<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryReport {
    /// `baseline` (before the rollout), `canary` (first hosts moved) or `fleet` (all moved).
    pub phase: String,
    /// The version whose answers the hit rate is computed over (all answers when none).
    #[serde(with = "tandem_types::version::optional", default)]
    pub version: Option<ModelVersion>,
    pub requests: u64,
    pub errors: u64,
    /// Answers whose embedding version differs from the index version (must be 0).
    pub mismatched: u64,
    /// Answers per index version.
    pub answered_by: BTreeMap<ModelVersion, u64>,
    pub hit_rate: f64,
    pub error_rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub seconds: f64,
    pub passed: bool,
    pub reason: String,
}

/// Probes `users` through the homefeed at `url` in rounds for `watch` (at least one round) and
/// computes the hit rate over answers served by `version` (all answers when `None`).
pub async fn measure(
    url: &str,
    opts: &ClientOptions,
    users: &[ProbeUser],
    cfg: &CanaryConfig,
    watch: Duration,
    phase: &str,
    version: Option<ModelVersion>,
) -> Result<CanaryReport> {
    let client = HomefeedClient::connect(url, opts).await?;
    let started = Instant::now();
    let (mut requests, mut errors, mut mismatched) = (0u64, 0u64, 0u64);
    let (mut hits, mut judged) = (0u64, 0u64);
    let mut answered_by: BTreeMap<ModelVersion, u64> = BTreeMap::new();
    let mut lat = Vec::new();
    loop {
        for u in users {
            let t = Instant::now();
            requests += 1;
            let answer = client
                .candidates(&u.user, cfg.k, false, Some(Duration::from_secs(2)))
                .await;
            match answer {
                Ok(r) => {
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                    if r.mismatched() {
                        mismatched += 1;
                    }
                    *answered_by.entry(r.index_version).or_default() += 1;
                    if version.is_none_or(|v| v == r.index_version) {
                        judged += 1;
                        if r.items.iter().any(|(item, _)| u.targets.contains(item)) {
                            hits += 1;
                        }
                    }
                }
                Err(_) => errors += 1,
            }
        }
        if started.elapsed() >= watch {
            break;
        }
        tokio::time::sleep(Duration::from_millis(cfg.interval_ms)).await;
    }
    lat.sort_by(f64::total_cmp);
    Ok(CanaryReport {
        phase: phase.into(),
        version,
        requests,
        errors,
        mismatched,
        answered_by,
        hit_rate: if judged == 0 {
            0.0
        } else {
            hits as f64 / judged as f64
        },
        error_rate: errors as f64 / requests.max(1) as f64,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        seconds: started.elapsed().as_secs_f64(),
        passed: true,
        reason: String::new(),
    })
}

/// Judges a watch report against the baseline; fills `passed` and `reason`.
pub fn judge(report: &mut CanaryReport, baseline: &CanaryReport, cfg: &CanaryConfig) {
    let mut problems = Vec::new();
    if report.error_rate > cfg.max_error_rate {
        problems.push(format!(
            "error rate {:.3} > {:.3}",
            report.error_rate, cfg.max_error_rate
        ));
    }
    if report.mismatched > 0 {
        problems.push(format!("{} mismatched answers", report.mismatched));
    }
    let answered = match report.version {
        Some(v) => report.answered_by.get(&v).copied().unwrap_or(0),
        None => report.answered_by.values().sum(),
    };
    let which = report
        .version
        .map_or_else(|| "any version".to_string(), |v| v.to_string());
    if answered == 0 {
        problems.push(format!("no probe was answered by {which}"));
    } else {
        let need = cfg.min_hit_ratio * baseline.hit_rate;
        if report.hit_rate < need {
            problems.push(format!(
                "live hit rate {:.3} < {:.2} × baseline {:.3}",
                report.hit_rate, cfg.min_hit_ratio, baseline.hit_rate
            ));
        }
    }
    report.passed = problems.is_empty();
    report.reason = if report.passed {
        format!(
            "hit rate {:.3} (baseline {:.3}), error rate {:.3}, {answered} answers by {which}",
            report.hit_rate, baseline.hit_rate, report.error_rate
        )
    } else {
        problems.join("; ")
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(hit: f64, errors: u64, by: &[(&str, u64)]) -> CanaryReport {
        CanaryReport {
            phase: "canary".into(),
            version: Some(ModelVersion(2)),
            requests: 100,
            errors,
            mismatched: 0,
            answered_by: by.iter().map(|(v, n)| (v.parse().unwrap(), *n)).collect(),
            hit_rate: hit,
            error_rate: errors as f64 / 100.0,
            p50_ms: 1.0,
            p99_ms: 2.0,
            seconds: 1.0,
            passed: true,
            reason: String::new(),
        }
    }

    #[test]
    fn a_hit_rate_collapse_fails_and_a_small_dip_passes() {
        let cfg = CanaryConfig::default();
        let base = report(0.6, 0, &[("v1", 100)]);
        let mut bad = report(0.1, 0, &[("v1", 60), ("v2", 40)]);
        judge(&mut bad, &base, &cfg);
        assert!(
            !bad.passed && bad.reason.contains("hit rate"),
            "{}",
            bad.reason
        );
        let mut ok = report(0.55, 0, &[("v1", 60), ("v2", 40)]);
        judge(&mut ok, &base, &cfg);
        assert!(ok.passed, "{}", ok.reason);
    }

    #[test]
    fn errors_or_no_answers_from_the_candidate_fail() {
        let cfg = CanaryConfig::default();
        let base = report(0.6, 0, &[("v1", 100)]);
        let mut errs = report(0.6, 5, &[("v2", 95)]);
        judge(&mut errs, &base, &cfg);
        assert!(!errs.passed && errs.reason.contains("error rate"));
        let mut none = report(0.0, 0, &[("v1", 100)]);
        judge(&mut none, &base, &cfg);
        assert!(!none.passed && none.reason.contains("no probe"));
    }
}
