// The metrics registry (proxy/metrics.h): families declared once with their
// labels; a series is its family and label values, rendered as Prometheus
// text (label values escaped as the text format wants, whatever bytes they
// hold) and parsed back only from another process's handoff.
#include "proxy/metrics.h"

#include <gtest/gtest.h>

#include <set>
#include <string>

#include "util/text.h"

using baton::proxy::Fam;
using baton::proxy::Series;
using baton::proxy::series;
using namespace std::string_literals;

TEST(MetricSeries, NoLabels) { EXPECT_EQ(series<Fam::ready>().text(), "baton_ready"); }

TEST(MetricSeries, LabelsInTheDeclaredOrder) {
  EXPECT_EQ(series<Fam::streams_total>("echo", "opened").text(),
            "baton_streams_total{route=\"echo\",result=\"opened\"}");
  EXPECT_EQ(series<Fam::streams_total>("echo", "opened").label("result"), "opened");
  EXPECT_EQ(series<Fam::streams_total>("echo", "opened").label("nope"), "");
}

TEST(MetricSeries, LabelValuesEscaped) {
  EXPECT_EQ(series<Fam::tunnels_cut_total>("a\\b\"c\nd").text(), "baton_tunnels_cut_total{reason=\"a\\\\b\\\"c\\nd\"}");
}

TEST(MetricSeries, LabelValuesAreValidUtf8) {
  const std::string s = series<Fam::tls_certificate_expiry_seconds>("\xff\xfe\xc0\xaf ok \xc3\xa9"s).text();
  EXPECT_TRUE(baton::util::valid_utf8(s));
  EXPECT_EQ(s, "baton_tls_certificate_expiry_seconds{cert=\"\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd ok \xc3\xa9\"}");
}

TEST(MetricSeries, ParseIsTheReverseOfText) {
  for (const Series& s : {series<Fam::ready>(), series<Fam::streams_total>("a\"b\\c\nd", "opened"),
                          series<Fam::bytes_total>("", "up"), series<Fam::handoff_tunnels_total>("sent")}) {
    std::optional<Series> back = Series::parse(s.text());
    ASSERT_TRUE(back.has_value()) << s.text();
    EXPECT_EQ(*back, s) << s.text();
  }
}

TEST(MetricSeries, ParseRefusesWhatThisBuildDoesNotDeclare) {
  for (const char* t : {"baton_nope", "baton_ready{x=\"1\"}", "baton_tunnels_total", "baton_tunnels_total{reason=\"x\"}",
                        "baton_streams_total{result=\"opened\",route=\"echo\"}", "baton_tunnels_total{result=\"x\"",
                        "baton_tunnels_total{result=\"x\"}tail", "baton_streams_total{route=\"echo\"}", ""}) {
    EXPECT_FALSE(Series::parse(t).has_value()) << t;
  }
}

TEST(MetricFamilies, DeclaredOnceWithUniqueNames) {
  std::set<std::string_view> names;
  for (const auto& f : baton::proxy::kFamilies) {
    EXPECT_TRUE(names.insert(f.name).second) << f.name;
    EXPECT_TRUE(f.type == "counter" || f.type == "gauge" || f.type == "histogram") << f.name;
    EXPECT_EQ(f.name.rfind("baton_", 0), 0u) << f.name;
    for (size_t i = 0; i < f.n_labels; ++i) EXPECT_FALSE(f.labels[i].empty()) << f.name;
  }
}
