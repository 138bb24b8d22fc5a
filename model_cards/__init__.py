"""Model cards: card data, its Jinja template, and the files an export writes beside the weights."""
