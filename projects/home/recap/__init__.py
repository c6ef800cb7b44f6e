"""The Heavy Ranker (Home recap): a multi-task MaskNet ranking model built from tml parts."""
