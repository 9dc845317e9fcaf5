"""The circuits stage: offline task datasets of clean/patch prompt pairs (`routesae circuit-data`)
and the search for the SAE latents that carry a task from one to the other (`routesae circuit`)."""
