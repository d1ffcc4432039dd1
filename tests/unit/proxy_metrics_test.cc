// Series names of the metrics registry (proxy/metrics.h): label values are
// escaped as the Prometheus text format wants, whatever bytes they hold.
#include "proxy/metrics.h"

#include <gtest/gtest.h>

#include <string>

#include "util/text.h"

using baton::proxy::series;
using namespace std::string_literals;

TEST(MetricSeries, NoLabels) { EXPECT_EQ(series("baton_ready"), "baton_ready"); }

TEST(MetricSeries, LabelValuesEscaped) {
  EXPECT_EQ(series("f", {{"route", "echo"}, {"result", "opened"}}), "f{route=\"echo\",result=\"opened\"}");
  EXPECT_EQ(series("f", {{"k", "a\\b\"c\nd"}}), "f{k=\"a\\\\b\\\"c\\nd\"}");
}

TEST(MetricSeries, LabelValuesAreValidUtf8) {
  const std::string s = series("f", {{"cert", "\xff\xfe\xc0\xaf ok \xc3\xa9"s}});
  EXPECT_TRUE(baton::util::valid_utf8(s));
  EXPECT_EQ(s, "f{cert=\"\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd ok \xc3\xa9\"}");
}
