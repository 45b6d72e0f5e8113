"""Corpus sources beyond the original four: one module per Debian/npm package that DATA.md allows.

Each module scans its package into a :class:`service.sources.common.Plan`; ``service.samples.build_corpus``
runs the plans. ``ktuberling`` (human spoken words + sprites), ``art4apps`` (illustrations with words in
seven caption languages), ``cldr`` (emoji names and keywords in every caption language, Noto images),
``gameicons`` (named silhouettes), ``scratch`` (named sounds, costumes and backdrops).
"""
