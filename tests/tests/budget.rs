//! The verifier budget of the production XDP programs (vpnlb-ebpf/budget.toml): verified
//! instructions, translated size and stack depth, each within the budget's tolerance. Prints the
//! figures either way, so a deliberate raise can copy them.
//!
//! Root only: run with `cargo xtask test budget`.

use vpnlb::dataplane::loader::object_bytes;
use vpnlb_tests::budget::{BUDGET_FILE, Budget, PROGRAMS, measure, table};

#[test]
#[ignore = "needs root and the eBPF object: run cargo xtask test"]
fn verifier_budget() {
    let obj = object_bytes().expect("eBPF object (cargo xtask build-ebpf)");
    let budget = Budget::load();
    let figures = measure(&obj);
    println!(
        "figure / budget ({BUDGET_FILE}):\n{}",
        table(&figures, Some(&budget))
    );
    let over: Vec<String> =
        PROGRAMS
            .into_iter()
            .flat_map(|name| {
                budget.exceeded(name, &figures[name]).into_iter().map(
                    move |(what, figure, limit)| format!("{name} {what} {figure} (budget {limit})"),
                )
            })
            .collect();
    assert!(
        over.is_empty(),
        "over the verifier budget by more than {}%: {}\nnew figures:\n{}raise them in {BUDGET_FILE} \
         in the same commit, with the reason",
        budget.tolerance_pct,
        over.join(", "),
        table(&figures, None)
    );
}
