"""codelm's modules below the scripts at the repository's root, one sub-package per concept;
``runtime`` is the ground floor every other module may import."""
