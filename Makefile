# Aliases for the habit of typing make: every target runs ./dev, which needs no make
# (./dev help lists the commands). The README's two commands are ./dev demo and ./dev check.
TARGETS := demo check venv lint types ops-lint test bench lock clean

.PHONY: $(TARGETS)

$(TARGETS):
	./dev $@
