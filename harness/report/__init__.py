"""Reports of discovered slices: figures and tables (``figures``), HTML pages (``html``)."""
