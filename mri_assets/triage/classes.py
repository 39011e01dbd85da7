"""What each label means, shown beside the slice (classes without an entry show their name)."""

DEFINITIONS = {
    "axial_inferior": (
        "Axial (transverse) slice through the lower half of the head: skull base, posterior "
        "fossa with cerebellum and brainstem, temporal lobes, orbits."
    ),
    "axial_superior": (
        "Axial (transverse) slice through the upper half of the head: lateral ventricles and "
        "above — centrum semiovale, cortex up to the vertex."
    ),
    "coronal": (
        "Coronal slice: the head seen from the front, left and right hemispheres side by side, "
        "top of the head up."
    ),
    "sagittal": (
        "Sagittal slice: the head seen from the side, face towards one edge, corpus callosum "
        "and brainstem in the midline slices."
    ),
}
