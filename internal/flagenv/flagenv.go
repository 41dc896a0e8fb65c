// Package flagenv lets every command-line flag also be set from the
// environment, which is how a chart sets flags it cannot template into args
// (secrets, downward-API values).
package flagenv

import (
	"flag"
	"fmt"
	"os"
	"strings"
)

// Name returns the variable for flag name: prefix + upper snake case.
func Name(prefix, flagName string) string {
	return prefix + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// Parse parses args into fs, then fills the flags not given from the
// environment (see Apply).
func Parse(fs *flag.FlagSet, args []string, prefix string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	return Apply(fs, prefix)
}

// Apply sets each flag of fs not given on the command line from its
// variable, if present. Call it after fs.Parse.
func Apply(fs *flag.FlagSet, prefix string) error {
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] || err != nil {
			return
		}
		if v, ok := os.LookupEnv(Name(prefix, f.Name)); ok {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("%s=%q: %w", Name(prefix, f.Name), v, e)
			}
		}
	})
	return err
}
