"""The privacy scorecard of an export bundle: ``PRIVACY.md`` for the privacy officer and
``privacy.json`` with the same figures for a machine.

Everything in it is read from what the service recorded: the dataset version (patient
split, de-identification profile), the batch's memorization report (policy, calibration,
flagged and removed counts) and the generator version's membership-inference audit. Where a
figure was not measured, the scorecard says so instead of leaving it out.
"""

from __future__ import annotations

import math
from typing import Any

from synthray.app.batches.schemas import CHOSEN_BY
from synthray.app.registry.summary import audit_unit, audit_verdict

FORMAT = "synthray-privacy/1"

THREAT_MODEL = (
    "The bundle leaves the hospital. Whoever holds it (the research partner, or anyone the "
    "bundle reaches later) may try to learn something about the patients whose films "
    "trained the generator: whether a given patient's film was among them (membership), "
    "or a film itself, copied or nearly copied by the generator. The images are synthetic; "
    "the risk is that a generator reproduces what it saw. The partner is assumed to hold "
    "the synthetic images and may hold other films of the same patients; the partner does "
    "not hold the generator's weights or the training films."
)

DOES_NOT_PROVE = [
    "No figure here is a formal privacy guarantee (such as differential privacy): the "
    "generator was not trained with one.",
    "The membership-inference figures are for the attacks listed, with the group sizes "
    "listed; a stronger attack or more data may do better. The AUROC interval is a "
    "bootstrap over those patients, not over attacks. Each patient is tested by one of "
    "their films, drawn at random: a generator that reproduced another film of a patient "
    "with many is left to the copy check, which compares every exported image with every "
    "training film.",
    "The copy check compares every exported image with every training film, but only in "
    "its similarity spaces: a copy altered beyond what those spaces tolerate (strong "
    "warps, heavy edits) can pass.",
    "The false-flag rate is estimated from films of held-out patients of the same site; "
    "films from another site or device may behave differently.",
    "De-identification covers what the service stored; it does not check pixels for "
    "burned-in text beyond what the ingest refused.",
]


def false_flag_interval(
    holdout: int, quantile: float, patients: int | None = None
) -> dict[str, Any]:
    """The rate at which the gate flags new real films of unseen patients, from the
    split-conformal calibration on ``holdout`` films: expected value and the 90% interval
    of the rate given a calibration draw, Beta(H + 1 - k, k) with k = ceil((H + 1) q)
    (Angelopoulos and Bates 2021, section 3.2; ties ignored).

    The interval takes the films as independent draws. One patient's films are alike, so
    a calibration on H films of P patients is worth somewhere between P and H independent
    ones: given ``patients`` (fewer than the films), the interval with H = P is stated too,
    the wider and safer of the two."""
    if holdout < 1:
        return {"calibration_images": holdout, "expected": None, "interval_90": None}
    out = {"calibration_images": holdout, **_conformal(holdout, quantile)}
    if patients is not None and 0 < patients < holdout:
        out["calibration_patients"] = patients
        out["interval_90_counting_patients"] = _conformal(patients, quantile)["interval_90"]
    return out


def _conformal(h: int, quantile: float) -> dict[str, Any]:
    from scipy.stats import beta

    k = min(h, math.ceil((h + 1) * quantile))
    a, b = h + 1 - k, k
    lo, hi = beta.ppf([0.05, 0.95], a, b)
    return {
        "expected": round(a / (a + b), 4),
        "interval_90": [round(float(lo), 4), round(float(hi), 4)],
    }


def scorecard(
    *,
    dataset: dict[str, Any],
    report: dict[str, Any],
    audit: dict[str, Any] | None,
    exported: int,
    removed: int,
    selection: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON twin. ``dataset``: the dataset version's holdout_fraction, split_seed,
    counts and provenance; ``report``: the batch's memorization report; ``audit``: the
    generator version's membership-inference audit (None where it never ran);
    ``selection``: how the batch's images were chosen from those drawn."""
    counts = dataset.get("counts") or {}
    per_class = counts.get("per_class") or {}
    summary = report["summary"]
    policy = report["policy"]
    calibration = report["calibration"]
    reid = (audit or {}).get("reidentification")
    planted = (audit or {}).get("planted_copies")
    return {
        "format": FORMAT,
        "threat_model": THREAT_MODEL,
        "patient_split": {
            "unit": "patient (pseudonymous key); no patient has films on both sides",
            "holdout_fraction": dataset.get("holdout_fraction"),
            "split_seed": dataset.get("split_seed"),
            "patients": counts.get("patients"),
            "holdout_patients": counts.get("holdout_patients"),
            "train_images": sum(int(v.get("train", 0)) for v in per_class.values()),
            "holdout_images": sum(int(v.get("holdout", 0)) for v in per_class.values()),
        },
        "deidentification": (dataset.get("provenance") or {}).get("deidentification"),
        "gate": {
            "rule": policy.get("rule"),
            "spaces": summary.get("spaces"),
            "thresholds": summary.get("thresholds"),
            "threshold_quantile": policy.get("threshold_quantile"),
            "max_flagged_fraction": policy.get("max_flagged_fraction"),
            "max_dcr_train_share": policy.get("max_dcr_train_share"),
            "false_flags_on_unseen_patients": false_flag_interval(
                int(calibration.get("holdout_images", 0)),
                float(policy.get("threshold_quantile", 0.95)),
                counts.get("holdout_patients"),
            ),
            "checked": summary.get("images"),
            "flagged": summary.get("flagged"),
            "removed": removed,
            "exported": exported,
            "dcr_train_share": summary.get("dcr_train_share"),
            "authenticity": summary.get("authenticity"),
            "passed": summary.get("passed"),
        },
        "selection": selection or {},
        "planted_copy_detection": planted,
        "membership_inference": audit,
        "reidentification": reid,
        "not_measured": (
            []
            if planted
            else [
                "the gate's detection rate on planted copies of this dataset's training "
                "films (measured in the project's tests on public films only)"
            ]
        )
        + ([] if audit else ["membership inference against this generator version"])
        + ([] if reid else ["re-identification of training patients from synthetic images"]),
        "does_not_prove": DOES_NOT_PROVE,
    }


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * float(x):.1f}%"


def _planted_lines(planted: dict[str, Any] | None) -> list[str]:
    """The gate's detection of planted copies of this site's training films, per family."""
    lines = ["", "## Does the gate catch altered copies? (planted copies of training films)", ""]
    if not planted:
        return [*lines, "Not measured for this generator version."]
    lo, hi = planted["interval_95"]
    verdict = "met" if planted["met"] else "NOT met"
    per_family = planted["planted"] // len(planted["per_family"])
    lines += [
        f"Altered copies of {planted['planted']} training films of this dataset, "
        f"{per_family} per family, "
        "every alteration's parameters drawn at random, were checked by the gate exactly as "
        f"this bundle was. It caught {planted['caught']} of {planted['planted']} "
        f"({_pct(planted['rate'])}; 95% interval {_pct(lo)} to {_pct(hi)}); the goal of "
        f"{_pct(planted['goal'])} is {verdict}.",
        "",
        "| alteration | caught |",
        "|---|---|",
    ]
    for family, f in planted["per_family"].items():
        lines.append(f"| {family} | {f['caught']} of {f['planted']} |")
    return lines


def markdown(card: dict[str, Any]) -> str:
    """PRIVACY.md: the scorecard in plain words."""
    split, gate, mia = card["patient_split"], card["gate"], card["membership_inference"]
    ff = gate["false_flags_on_unseen_patients"]
    deid = card["deidentification"] or {}
    lines = [
        "# Privacy scorecard",
        "",
        "Every image in this bundle is synthetic. This page says what was done to keep the "
        "patients behind the generator's training films out of it, what was measured, and "
        "what the measurements do not prove. The same figures are in privacy.json.",
        "",
        "## Threat model",
        "",
        card["threat_model"],
        "",
        "## How patients were split",
        "",
        f"Films were split by patient before training: {split['holdout_patients']} of "
        f"{split['patients']} patients (fraction {split['holdout_fraction']}, seed "
        f"{split['split_seed']}) were held out; the generator never saw their "
        f"{split['holdout_images']} films. It trained on films of the other patients "
        f"({split['train_images']} films in the training split).",
        "",
        "## De-identification at ingest",
        "",
    ]
    if deid:
        lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in deid.items()]
    else:
        lines.append("Not recorded for this dataset version.")
    lines += [
        "",
        "## Memorization gate (every exported image against every training film)",
        "",
        f"Rule: {gate['rule']}.",
        "",
        f"- Similarity spaces: {', '.join(gate['spaces'] or [])}; thresholds "
        + ", ".join(f"{k} {v:.4f}" for k, v in (gate["thresholds"] or {}).items())
        + f", set at the {gate['threshold_quantile']} quantile of held-out patients' films.",
        f"- False flags on films of unseen patients: expected {_pct(ff['expected'])}, 90% "
        f"interval {', '.join(_pct(v) for v in ff['interval_90'] or [])} "
        f"(calibrated on {ff['calibration_images']} held-out films)"
        + (
            f"; those films are of {ff['calibration_patients']} patients, whose films are "
            "alike, so the calibration is worth between "
            f"{ff['calibration_patients']} and {ff['calibration_images']} independent "
            "films: counting patients, the 90% interval is "
            f"{', '.join(_pct(v) for v in ff['interval_90_counting_patients'])}."
            if ff.get("interval_90_counting_patients")
            else "."
        ),
        f"- This batch: {gate['checked']} checked, {gate['flagged']} flagged, "
        f"{gate['removed']} removed, {gate['exported']} exported; distance-to-closest-"
        f"record train share {gate['dcr_train_share']} (as many training as held-out "
        "patients, one film each; 0.5 is ideal, the gate fails "
        f"above {gate['max_dcr_train_share']}); authenticity {gate['authenticity']}.",
        "",
    ]
    chosen = card.get("selection") or {}
    if chosen.get("drawn"):
        lines += [
            f"The batch's {chosen['kept']} images were chosen from {chosen['drawn']} drawn "
            f"(oversample {chosen['oversample']:g}): {CHOSEN_BY[chosen.get('by', 'typical')]}"
            ". Every chosen image was checked by the gate; the membership-inference audit "
            "below ran on the generator's images before any such choice.",
            "",
        ]
    lines += _planted_lines(card["planted_copy_detection"])
    lines += [
        "",
        "## Membership inference (can an attacker tell training patients from others?)",
        "",
    ]
    if not mia:
        lines.append("Not measured: this generator version has no membership-inference audit.")
    elif mia.get("skipped"):
        lines.append(f"Not measured: {mia['skipped']}.")
    else:
        goal = mia["goal"]
        if audit_unit(mia) == "patients":
            who = (
                f"{mia['members']} training patients (members) against {mia['nonmembers']} "
                "held-out patients (non-members), one film each drawn at random, matched by "
                f"class (drawn from {mia['train_patients']} training and "
                f"{mia['holdout_patients']} held-out patients; one patient's films look "
                "alike, so the patient, not the film, is what is counted)"
            )
        else:
            who = (
                f"{mia['members']} training films (members) against {mia['nonmembers']} films "
                "of held-out patients (non-members), matched by class"
            )
        lines += [
            f"{who}; {mia['synthetic']} synthetic "
            "images that the audit drew from the generator when it was registered (not this "
            "bundle's images). Control: the same attack on two disjoint sets of non-members "
            f"({mia['control_nonmembers']} posing as members"
            + (", the non-members halved" if audit_unit(mia) == "patients" else "")
            + "), which nothing can tell apart "
            "and should score an AUROC near 0.5."
            + (
                " Space control, for the nearest-synthetic attacks: the same attack with "
                f"{mia['space_control_films']} real films of "
                f"{mia.get('space_control_patients', mia['space_control_films'])} training "
                "patients who are not members in place of the synthetic images. A "
                "similarity space learned from the training films (the supervised encoder, "
                "the copy-detection embedding) may place members nearer any film than it "
                "places unseen patients, with no generator involved; the space control "
                "shows how much of an attack's AUROC that explains."
                if mia.get("space_control_films")
                else ""
            )
            + " Goal: AUROC at most "
            f"{goal['auroc']} and true-positive rate at most {_pct(goal['tpr_at_1pct_fpr'])} at "
            "1% false positives, for every attack.",
            "",
            "| attack | space | AUROC [95% bootstrap] | TPR at 1% FPR | control AUROC | "
            "control TPR | space control AUROC |",
            "|---|---|---|---|---|---|---|",
        ]
        for a in mia["attacks"]:
            lo, hi = a["auroc_interval"]
            c = a["control"]
            space = a.get("space_control")
            lines.append(
                f"| {a['attack']} | {a['space']} | {a['auroc']:.3f} [{lo:.3f}, {hi:.3f}] | "
                f"{_pct(a['tpr_at_1pct_fpr'])} | {c['auroc']:.3f} | "
                f"{_pct(c['tpr_at_1pct_fpr'])} | " + (f"{space['auroc']:.3f} |" if space else "- |")
            )
        lines += _by_draw(mia)
        lines += [
            "",
            f"Worst AUROC {mia['worst_auroc']:.3f}, worst TPR at 1% FPR "
            f"{_pct(mia['worst_tpr_at_1pct_fpr'])}: {audit_verdict(mia)}. With "
            f"{mia['nonmembers']} non-members, at most {int(mia['nonmembers'] * 0.01)} of "
            "them may score above the 1% FPR threshold, and the TPR moves in steps of "
            f"{_pct(mia['tpr_resolution'])}: small groups make these figures coarse.",
        ]
        chance = mia.get("worst_tpr_by_chance")
        if chance:
            lines += [
                "",
                "What chance alone gives at these group sizes (the member and non-member "
                f"labels permuted {chance['rounds']} times, every attack scored again): a "
                f"worst TPR of {_pct(chance['median'])} (median) and {_pct(chance['p95'])} "
                f"(95th percentile); chance exceeds the {_pct(goal['tpr_at_1pct_fpr'])} goal "
                f"in {_pct(chance['above_goal'])} of draws. The observed worst TPR has "
                f"p = {chance['p_value']:.3f} against chance (a small p is evidence of "
                "membership leakage; a large one means the TPR figure cannot tell this "
                "generator from one that leaks nothing). "
                + (
                    "Each patient is one film, so patients, which are independent, are what "
                    "is permuted. "
                    if audit_unit(mia) == "patients"
                    else "The permutation treats films as independent, although one "
                    "patient's films are alike. "
                )
                + "The verdict above does not use it: it is the goal as written.",
            ]
    lines += ["", "## Re-identification", ""]
    reid = card["reidentification"]
    if not reid:
        lines.append("Not measured for this generator version.")
    elif reid.get("skipped"):
        lines.append(f"Not measured: {reid['skipped']}.")
    else:
        lines += [
            "Chest films identify their patient. A re-identification embedding (the "
            "copy-detection network, trained with two films of one patient as a match) "
            "was calibrated on held-out patients it never saw: above similarity "
            f"{reid['threshold']}, at least {_pct(reid['precision_target'])} of nearest "
            "films belong to the same patient.",
            "",
            f"- Its strength: it names the right patient for {_pct(reid['top1_same_patient'])} "
            f"of the {reid['holdout_multi_film']} held-out films whose patient has another "
            f"film, {_pct(reid['reidentified_with_confidence'])} with that confidence.",
            f"- Synthetic images it would confidently match to a training patient: "
            f"{_pct(reid['synthetic_reidentified'])} of {reid['synthetic']}.",
            f"- Control: films of {reid['control_single_film']} held-out patients with one "
            f"film (no true match among the training films) above the threshold: "
            f"{_pct(reid['control_single_film_above'])}.",
        ]
    lines += ["", "## Not measured for this bundle", ""]
    lines += [f"- {x}" for x in card["not_measured"]]
    lines += ["", "## What these figures do not prove", ""]
    lines += [f"- {x}" for x in card["does_not_prove"]]
    return "\n".join(lines) + "\n"


def _by_draw(mia: dict[str, Any]) -> list[str]:
    """The nearest-synthetic attacks' AUROC with each of the audit's draws alone, where it
    drew several: how much one draw's chance moves them, which the bootstrap intervals
    (over patients, the images held fixed) leave out."""
    per_attack = [a["auroc_by_draw"] for a in mia["attacks"] if a.get("auroc_by_draw")]
    if not per_attack:
        return []
    worst = [max(values) for values in zip(*per_attack, strict=True)]
    each = ", ".join(f"{w:.3f}" for w in worst)
    return [
        "",
        f"The {mia['synthetic']} synthetic images are {len(worst)} draws alike. With each "
        f"draw alone, the worst nearest-synthetic AUROC reads {each}: that is how far one "
        "draw's chance moves these attacks, which the bootstrap intervals above (over "
        "patients, the images held fixed) leave out. The figures above use every draw "
        "together, which moves them less.",
    ]
