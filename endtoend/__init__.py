"""End to end, from images: predict, fine-tune the backbone, export, and the HTML report."""
