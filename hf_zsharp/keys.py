"""Names that several modules must agree on, in a module that imports nothing: the files a run writes to its
output folder, and the statistics the two-pass step logs."""

CARD_NAME = "README.md"
CURVES_NAME = "training_curves.png"
ZSHARP_ARGS_NAME = "zsharp_args.json"
# The record of what a run wrote to its output folder (and may publish): `push_to_hub` on the folder uploads it.
MANIFEST_NAME = "zsharp_manifest.json"

# The statistics `SAM.first_step` leaves in `ascent_stats`, and those the two-pass step logs, in this order: the
# ascent statistics with a `sam_` prefix (means over the perturbed steps), the mean loss increase L(w + e) - L(w)
# and the count of steps skipped for non-finite gradients.
ASCENT_STATISTICS = ("perturbation_norm", "kept_fraction")
LOGGED_STATISTICS = (*(f"sam_{name}" for name in ASCENT_STATISTICS), "sam_loss_increase", "sam_skipped_steps")
