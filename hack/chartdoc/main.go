// Command chartdoc writes each chart's README.md from its Chart.yaml, the
// `# --` comments of its values.yaml and its README.md.gotmpl (helm-docs
// style; see internal/chartdoc). With -check it changes nothing and fails when
// a README is out of date.
//
//	go run ./hack/chartdoc charts/spectro-proxy charts/spectro-proxy-server
//	go run ./hack/chartdoc -check charts/spectro-proxy charts/spectro-proxy-server
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/spectroproxy/spectro-proxy/internal/chartdoc"
)

func main() {
	check := flag.Bool("check", false, "Fail when a README.md is out of date instead of writing it.")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: chartdoc [-check] CHART_DIR...")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	failed := false
	for _, dir := range flag.Args() {
		var err error
		if *check {
			err = chartdoc.Check(dir)
		} else {
			err = chartdoc.Write(dir)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "chartdoc:", err)
			failed = true
		}
	}
	if failed {
		os.Exit(1)
	}
}
