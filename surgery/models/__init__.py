"""Models by reference: factory references and their trust rules, known names, zoo recipes, checkpoints."""
